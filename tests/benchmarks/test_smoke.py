"""Smoke tests of the benchmark scripts that back the numbers in docs/performance.md.

Each script runs end to end with tiny arguments, mostly on a tiny random-weight chat model built
here (a byte-level tokenizer with a ChatML template and a 2-layer Llama, as an HF folder), so a
script that no longer runs, or prints a broken table, fails the suite. The numbers themselves mean
nothing here: benchmarks are scripts, not timed tests.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_model

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def run_script(name: str, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row whose first cell matches ``first_cell`` (a regex)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(first_cell, cells[0]):
            rows.append(cells)
    return rows


def numbers(cells: list[str]) -> list[float]:
    """A table row's numeric cells ("1.54x", "1,388"), each checked to be a finite number >= 0 (rates
    may round to 0.0 on a busy machine; times are checked > 0 where they are read)."""
    values = [float(c.rstrip("x").replace(",", "")) for c in cells]
    assert all(0 <= v < float("inf") for v in values), cells
    return values


def need_kernels() -> None:
    from leanserve import kernels

    if kernels.ops() is None:
        pytest.skip(f"the native kernels are unavailable here: {kernels.status()}")


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """An HF folder: a byte-level BPE tokenizer (one token per byte) with <|im_start|>/<|im_end|> and
    a ChatML template, and a random 2-layer Llama over its vocabulary."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-chat")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                                   eos_token_id=tok.token_to_id("<|im_end|>"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


# ---- whole-engine scripts, on the tiny model ---------------------------------------------------

def test_throughput_runs_hf_and_leanserve_on_the_chat_prompts(tiny_chat_model):
    out = run_script("throughput.py", "--model", str(tiny_chat_model), "--num-prompts", "2", "--hf-prompts", "1",
                     "--max-tokens", "2").stdout
    hf = re.search(r"HF transformers generate, one at a time \(1 prompts\):\s+([\d.]+) output tok/s", out)
    ours = re.search(r"leanserve offline batch \(2 prompts\):\s+([\d.]+) output tok/s", out)
    assert hf and ours, out
    assert float(hf.group(1)) > 0 and float(ours.group(1)) > 0
    assert re.search(r"ratio leanserve / HF: [\d.]+x", out), out


def test_serve_vs_offline_sends_the_same_prompts_to_both_sides(tiny_chat_model, tmp_path):
    result = tmp_path / "r.json"
    run_script("serve_vs_offline.py", "--model", str(tiny_chat_model), "--num-prompts", "2", "--max-tokens", "3",
               "--concurrency", "1", "--json", str(result))
    r = json.loads(result.read_text())
    assert r["offline"]["output_tokens"] == 6
    assert (r["server"]["completed"], r["server"]["failed"], r["server"]["total_output_tokens"]) == (2, 0, 6)
    # the server counts the same chat-templated prompt tokens as the offline engine
    assert r["server"]["total_input_tokens"] == r["offline"]["input_tokens"]
    assert r["ratio"] > 0


def test_decode_step_kernels_on_against_off_with_profile(tiny_chat_model):
    proc = run_script("decode_step.py", "--model", str(tiny_chat_model), "--batch", "1,2", "--steps", "2",
                      "--warmup", "2", "--profile")
    rows = table_rows(proc.stdout, r"\d+")
    assert [r[0] for r in rows] == ["1", "2"], proc.stdout
    assert all(min(numbers(r[1:])[:2]) > 0 for r in rows), proc.stdout  # step ms of both sides
    assert "LEANSERVE_KERNELS=0" in proc.stdout
    assert proc.stderr.count("Self CPU") >= 2  # one profile table per batch size


def test_decode_step_native_loop_against_python_layers(tiny_chat_model):
    proc = run_script("decode_step.py", "--model", str(tiny_chat_model), "--native", "--dtype", "bfloat16",
                      "--batch", "1,2", "--steps", "2", "--warmup", "2", "--rounds", "1")
    assert "native loop applies: True" in proc.stdout, proc.stdout
    rows = table_rows(proc.stdout, r"\d+")
    assert [r[0] for r in rows] == ["1", "2"] and all(min(numbers(r[1:])[:2]) > 0 for r in rows), proc.stdout


# ---- kernel micro-benchmarks ---------------------------------------------------------------------

def test_qlinear_against_blas_on_smollm2_shapes():
    need_kernels()
    out = run_script("qlinear.py", "--rows", "1,2", "--repeats", "1").stdout
    rows = table_rows(out, r"\w+ \d+x\d+")
    assert [(r[0].split()[0], r[1], r[2]) for r in rows] == [
        (name, fmt, rows_) for name, fmt in [("qkv_proj", "Q4_1"), ("o_proj", "Q4_1"), ("gate_up_proj", "Q4_1"),
                                             ("down_proj", "Q4_1"), ("lm_head", "Q8_0")] for rows_ in ("1", "2")]
    assert all(min(numbers(r[3:])[:2]) > 0 for r in rows), out  # µs of both sides, ratio, GB/s


@pytest.mark.model
def test_qlinear_model_pass_over_smollm2s_own_blocks():
    need_kernels()
    require_model("smollm2-135m")
    out = run_script("qlinear.py", "--model-pass", "--rows", "1", "--repeats", "1").stdout
    assert re.search(r"121 quantized matmuls, \d+ MB of blocks", out), out
    rows = table_rows(out, r"\d+")
    assert [r[0] for r in rows] == ["1"] and min(numbers(rows[0][1:])[:2]) > 0, out


@pytest.mark.model
@pytest.mark.parametrize("kv", [False, True])
def test_quant_speed_throughput_alternates_two_engines_in_one_process(kv):
    need_kernels()
    require_model("smollm2-135m")
    out = run_script("quant_speed.py", "throughput", "--prompts", "2", "--max-tokens", "3", "--rounds", "1",
                     *(["--kv", "--kv-cache-memory", "16MiB"] if kv else [])).stdout
    names = ["KV model dtype", "KV int8"] if kv else ["float copy", "blocks only"]
    rows = table_rows(out, r"\d+")
    assert [(r[0], r[1]) for r in rows] == [("1", n) for n in names], out
    # output tok/s > 0, requests a step (2 prompts: at most 2), no preemptions with room for both
    assert all(numbers(r[2:3])[0] > 0 and 0 < numbers(r[3:4])[0] <= 2 and numbers(r[4:5]) == [0.0] for r in rows), out
    assert re.search(rf"{names[1]} / {names[0]}: \d+\.\d+x", out), out
    if kv:
        assert "KV cache " in out and "in int8" in out, out


@pytest.mark.model
def test_quant_speed_five_step_alternates_the_two_layouts():
    """five-step on SmolLM2 (no Q5 layers: both engines hold the same blocks) runs both engines and
    reports a step time for each batch."""
    need_kernels()
    require_model("smollm2-135m")
    out = run_script("quant_speed.py", "five-step", "--model", "smollm2-135m", "--batch", "1,2", "--rounds", "1").stdout
    rows = table_rows(out, r"\d+")
    assert [r[0] for r in rows] == ["1", "2"], out
    assert all(len(numbers(r[1:3])) == 2 and min(numbers(r[1:3])) > 0 for r in rows), out


def test_attention_kernel_against_gather_and_sdpa():
    need_kernels()
    out = run_script("attention.py", "--batch", "1", "3", "--context", "16", "40", "--min-time", "0").stdout
    rows = table_rows(out, r"\d+")
    assert [(r[0], r[1]) for r in rows] == [("1", "16"), ("1", "40"), ("3", "16"), ("3", "40")], out
    assert all(min(numbers(r[2:])[:2]) > 0 for r in rows), out


def test_attention_kernel_over_the_8bit_cache():
    need_kernels()
    out = run_script("attention.py", "--kv-cache-dtype", "int8", "--dtype", "bfloat16", "--batch", "2",
                     "--context", "40", "--min-time", "0").stdout
    assert "| kernel, bfloat16 cache ms | kernel, int8 cache ms |" in out, out
    rows = table_rows(out, r"\d+")
    assert [(r[0], r[1]) for r in rows] == [("2", "40")] and min(numbers(rows[0][2:])[:2]) > 0, out


def test_amx_linear_runs_where_amx_is_and_says_why_not_elsewhere():
    from leanserve import kernels

    proc = run_script("amx_linear.py", "--rows", "1,16", "--layers", "1", "--repeats", "1", check=False)
    if kernels.amx_available():
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = table_rows(proc.stdout, r"\d+")
        assert [r[0] for r in rows] == ["1", "16"] and all(min(numbers(r[1:])[:2]) > 0 for r in rows), proc.stdout
    else:
        assert proc.returncode != 0 and "no AMX-BF16" in proc.stderr, (proc.returncode, proc.stderr)


# ---- peers.py: vLLM and llama.cpp are not installed here, so its arguments, commands and report ----

@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_under_test", BENCHMARKS / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peers_parses_the_published_commands_and_rejects_bad_levels(peers, capsys):
    args = peers.parse_args(["run", "--concurrency", "1,32,64,80", "--vllm-dtype", "bfloat16"])
    assert (args.cmd, args.concurrency, args.vllm_dtype, args.offline) == ("run", "1,32,64,80", "bfloat16", True)
    assert peers.parse_args(["install", "llamacpp"]).peer == "llamacpp"
    for bad in ("1,x", "0,32"):
        with pytest.raises(SystemExit) as e:
            peers.parse_args(["run", "--concurrency", bad])
        assert e.value.code == 2
    assert "--concurrency" in capsys.readouterr().err


def test_peers_runs_only_the_servers_installed(peers, tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEERS", tmp_path)
    assert list(peers.server_commands(8000, 80)) == ["leanserve"]
    llama = tmp_path / "llama.cpp" / "build" / "bin" / "llama-server"
    llama.parent.mkdir(parents=True)
    llama.touch()
    cmds = peers.server_commands(8000, 80)
    assert list(cmds) == ["leanserve", "llama.cpp"]
    assert cmds["llama.cpp"][cmds["llama.cpp"].index("-np") + 1] == "80"


def test_peers_report_from_a_canned_run(peers):
    results = {"leanserve": {1: 117.1, 80: 944.4}, "llama.cpp": {1: 69.0, 80: 139.8},
               "vllm-cpu-bfloat16": {1: 24.8, 80: 486.5}}
    runs = {"leanserve": {80: {"total_input_tokens": 8000, "total_cached_tokens": 1000, "total_output_tokens": 10240,
                               "duration": 10.0}}}
    limits = {"read_bytes_per_s": 22.3e9, "weights_read_bytes_per_s": 40e9, "fp32_flops": 330e9, "bf16_flops": 2181e9}
    lines = peers.report([1, 80], results, runs, limits, weight_bytes=111.5e6, params=135_000_000, dtype="bfloat16",
                         output_len=128, num_prompts_single=8, alone=112.0, offline=(979.6, 1614.0, 80))
    text = "\n".join(lines)
    assert "leanserve / llama.cpp: c=1: 1.70x, c=80: 6.76x; best vs best: 6.76x" in text
    assert "leanserve / vllm-cpu-bfloat16: c=1: 4.72x, c=80: 1.94x; best vs best: 1.94x" in text
    assert "bandwidth limit 200 tok/s; 1 client at 117.1 tok/s = 59% of it; the engine alone 56%" in text
    # computed at c=80: (8000 - 1000 + 10240) / 10 s = 1724 tok/s; bf16 limit 2181e9 / 0.27e9 = 8078 tok/s
    assert "leanserve at c=80 computed 1724 tok/s (prompt + output) = 21% of it; offline 1614 tok/s = 20%" in text
    assert "leanserve offline (bfloat16, 80 prompts in one batch): 979.6 output tok/s" in text


@pytest.mark.model
def test_eval_vs_hf_scores_the_same_items_both_ways():
    require_model("smollm2-135m")
    out = json.loads(run_script("eval_vs_hf.py", "--items", "2", "--json").stdout.strip().splitlines()[-1])
    assert out["items"] == 2 and out["same_choices"] == 2
    assert out["leanserve_s"] > 0 and out["hf_s"] > 0 and out["speedup"] == pytest.approx(out["hf_s"] / out["leanserve_s"], rel=0.05)


def test_attention_fold_against_sdpa_per_sequence():
    need_kernels()
    out = run_script("attention_fold.py", "--batch", "2", "--context", "40", "--query", "5", "--min-time", "0").stdout
    rows = table_rows(out, r"\d+")
    assert [r[:3] for r in rows] == [["2", "40", "5"]], out
    assert all(v > 0 for v in numbers(rows[0][3:5])), out


def test_spec_decode_runs_servers_side_by_side(tiny_chat_model):
    out = run_script("spec_decode.py", "--model", str(tiny_chat_model), "--methods", "off,ngram",
                     "--rows", "code-edit:1", "--num-prompts", "1", "--output-len", "8", timeout=600).stdout
    rows = table_rows(out, "code-edit")
    assert len(rows) == 1 and rows[0][1] == "1", out
    off, ngram = numbers([rows[0][2], rows[0][3].split()[0]])  # "41.0", "52.3 (1.28x)"
    assert off > 0 and ngram > 0, out
