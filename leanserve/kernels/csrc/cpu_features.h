// What the kernels may use on this CPU, decided at run time: each .cpp is compiled for AVX2 and
// marks its AVX-512 functions with LS_AVX512, calling them only where use_avx512_bf16() says so.
#pragma once

#include <cstdlib>
#include <string>

#define LS_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

namespace leanserve_cpu {

// AVX512-BF16 in this CPU, and not turned off with LEANSERVE_AVX512=0 (read per call: tests compare both paths).
inline bool use_avx512_bf16() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("LEANSERVE_AVX512");
  return cpu && !(env && std::string(env) == "0");
}

}  // namespace leanserve_cpu
