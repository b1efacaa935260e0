// The decoder layers of a model for one decode step (every sequence one new token), in one call:
// the same operators the Python layers call (rms_norm, qlinear or amx_linear, rotary_, write_kv_,
// paged_attention_decode, act_mul, and ATen's add/linear), in the same order on the same tensors,
// so the result is bit for bit the Python path's (model/native.py builds the arguments). What it
// removes is the Python between them: at one sequence a SmolLM2 step makes ~400 such calls.
//
// A layer (Llama: no post-attention or post-MLP norm, no q/k norms; Gemma 3: all of them):
//   x = norm_in(h); q, k, v = split(qkv(x)); q, k = q_norm(q), k_norm(k); rotary(q, k)
//   write k, v; a = o(attention(q)); h = h + norm_post_attn(a)
//   h = h + norm_post_mlp(down(act(gate) * up(norm_pre_mlp(h))))
//
//   h          : (n, hidden) the embedded tokens, float32 or bfloat16
//   positions  : (n,) int64; slots (n,) int64; tables (n, max_blocks) int64; lens (n,) int64
//   kv         : [k_cache_0, v_cache_0, k_cache_1, ...]
//   weights    : per layer kLayerTensors tensors: the norms (input, post-attention, pre-MLP,
//                post-MLP, q, k), the layer's rotary cos and sin ((max_positions, head_dim / 2)
//                float32), then per linear (qkv, o, gate_up, down) kLinearTensors: qs, scales,
//                mins, amx, weight, bias; an empty tensor where there is none (mins may be (N, 0))
//   ints       : num_heads, num_kv_heads, head_dim, act, then per layer: window (0 = full), and per
//                linear: bits, max_rows (qlinear up to that many rows)
//   floats     : rms_norm eps, attention scale, norm offset (Gemma: 1)
// Returns h after the last layer (before the final norm).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

constexpr int64_t kNorms = 6, kLinearTensors = 6, kLayerTensors = kNorms + 2 + 4 * kLinearTensors;
constexpr int64_t kGlobalInts = 4, kLayerInts = 1 + 4 * 2;

using T = const at::Tensor&;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The other libraries' operators, looked up on first use (all are loaded by then).
struct Ops {
  c10::TypedOperatorHandle<at::Tensor(T, T, double, double)> rms_norm = find<at::Tensor(T, T, double, double)>("leanserve::rms_norm");
  c10::TypedOperatorHandle<at::Tensor(T, T, T, T, int64_t)> qlinear = find<at::Tensor(T, T, T, T, int64_t)>("leanserve::qlinear");
  c10::TypedOperatorHandle<at::Tensor(T, T, T, T, int64_t, int64_t)> qlinear_dense =
      find<at::Tensor(T, T, T, T, int64_t, int64_t)>("leanserve::qlinear_dense");
  c10::TypedOperatorHandle<at::Tensor(T, T)> amx_linear = find<at::Tensor(T, T)>("leanserve::amx_linear");
  c10::TypedOperatorHandle<void(T, T, T, T, T)> rotary = find<void(T, T, T, T, T)>("leanserve::rotary_");
  c10::TypedOperatorHandle<void(T, T, T, T, T)> write_kv = find<void(T, T, T, T, T)>("leanserve::write_kv_");
  c10::TypedOperatorHandle<at::Tensor(T, T, T, T, T, double, int64_t)> attention =
      find<at::Tensor(T, T, T, T, T, double, int64_t)>("leanserve::paged_attention_decode");
  c10::TypedOperatorHandle<at::Tensor(T, int64_t)> act_mul = find<at::Tensor(T, int64_t)>("leanserve::act_mul");
};

const Ops& ops() {
  static const Ops o;
  return o;
}

// model/layers.py Linear.forward: qlinear up to max_rows rows, else the AMX kernel, else ATen on the
// float weight, or qlinear_dense where the blocks are the only copy (no weight).
at::Tensor linear(const at::Tensor& x, const at::Tensor* t, const int64_t* cfg) {
  const at::Tensor &qs = t[0], &scales = t[1], &mins = t[2], &amx = t[3], &weight = t[4], &bias = t[5];
  at::Tensor y;
  if (qs.numel() && x.size(0) <= cfg[1]) y = ops().qlinear.call(x, qs, scales, mins, cfg[0]);
  else if (amx.numel()) y = ops().amx_linear.call(x, amx);
  else if (qs.numel() && !weight.numel()) y = ops().qlinear_dense.call(x, qs, scales, mins, cfg[0], 0);
  else return at::linear(x, weight, bias.numel() ? std::optional<at::Tensor>(bias) : std::nullopt);
  return bias.numel() ? y + bias : y;
}

at::Tensor decode_layers(const at::Tensor& h_in, const at::Tensor& positions, const at::Tensor& slots,
                         const at::Tensor& tables, const at::Tensor& lens, at::TensorList kv, at::TensorList weights,
                         at::IntArrayRef ints, at::ArrayRef<double> floats) {
  TORCH_CHECK(ints.size() >= kGlobalInts && floats.size() == 3, "decode_layers: ints or floats malformed");
  const int64_t layers = static_cast<int64_t>(kv.size()) / 2;
  TORCH_CHECK(static_cast<int64_t>(kv.size()) == 2 * layers && static_cast<int64_t>(weights.size()) == layers * kLayerTensors &&
                  static_cast<int64_t>(ints.size()) == kGlobalInts + layers * kLayerInts,
              "decode_layers: ", kv.size(), " caches, ", weights.size(), " weights and ", ints.size(),
              " ints do not describe whole layers");
  TORCH_CHECK(h_in.dim() == 2, "decode_layers: h must be (tokens, hidden), got ", h_in.sizes());
  const int64_t H = ints[0], KVH = ints[1], D = ints[2], act = ints[3], n = h_in.size(0);
  const double eps = floats[0], scale = floats[1], offset = floats[2];
  const Ops& O = ops();
  // norm i of the layer, or x itself where the layer has none
  auto norm = [&](const at::Tensor& x, const at::Tensor& w) { return w.numel() ? O.rms_norm.call(x, w, eps, offset) : x; };
  at::Tensor h = h_in;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* W = weights.data() + l * kLayerTensors;
    const at::Tensor* L = W + kNorms + 2;  // the linears
    const int64_t* I = ints.data() + kGlobalInts + l * kLayerInts;
    const at::Tensor &k_cache = kv[2 * l], &v_cache = kv[2 * l + 1];
    // attention: the fused qkv output split into per-head views (q/k norms make new tensors), rotated in place
    const at::Tensor qkv = linear(norm(h, W[0]), L, I + 1);
    const at::Tensor q = norm(qkv.narrow(1, 0, H * D).view({n, H, D}), W[4]);
    const at::Tensor k = norm(qkv.narrow(1, H * D, KVH * D).view({n, KVH, D}), W[5]);
    const at::Tensor v = qkv.narrow(1, (H + KVH) * D, KVH * D).view({n, KVH, D});
    O.rotary.call(q, k, W[kNorms], W[kNorms + 1], positions);
    O.write_kv.call(k_cache, v_cache, k, v, slots);
    const at::Tensor att = O.attention.call(q, k_cache, v_cache, tables, lens, scale, I[0]);
    h = h + norm(linear(att.reshape({n, H * D}), L + kLinearTensors, I + 3), W[1]);
    // gated MLP
    const at::Tensor gate_up = linear(norm(h, W[2]), L + 2 * kLinearTensors, I + 5);
    h = h + norm(linear(O.act_mul.call(gate_up, act), L + 3 * kLinearTensors, I + 7), W[3]);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("decode_layers(Tensor h, Tensor positions, Tensor slots, Tensor tables, Tensor lens, Tensor(a!)[] kv, "
        "Tensor[] weights, int[] ints, float[] floats) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}
