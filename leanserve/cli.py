"""`leanserve serve | generate | bench | pull | models`: argument parsing and one-line errors."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from leanserve.argtypes import positive_int
from leanserve.config import parse_bytes


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from leanserve.model.registry import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in model name, .gguf file or HF folder (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None, metavar="SIZE",
                   help="bytes for the KV cache, e.g. 1GiB (default: 1GiB on CPU, 80%% of free GPU memory)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for the model (default: one per core, torch's choice; stated at start-up)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                enable_prefix_caching=not args.no_prefix_caching, threads=args.threads)


def ensure_model(name: str) -> None:
    """Built-in names are pulled on first use, so `leanserve serve` works with no arguments."""
    from leanserve.model.registry import BUILTIN_MODELS, is_pulled, pull

    if name in BUILTIN_MODELS and not is_pulled(name):
        print(f"{name} is not in the model store yet: pulling it", file=sys.stderr)
        pull(name, lambda s: print(s, file=sys.stderr))


def cmd_pull(args: argparse.Namespace) -> int:
    from leanserve.model.registry import pull

    for name in args.names:
        pull(name, lambda s: print(s, file=sys.stderr), force=args.force)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from leanserve.model.registry import BUILTIN_MODELS, builtin_path, is_pulled, model_store

    print(f"model store: {model_store()}")
    for m in BUILTIN_MODELS.values():
        where = str(builtin_path(m.name)) if is_pulled(m.name) else f"not pulled (leanserve pull {m.name})"
        print(f"  {m.name:<14} {m.description}; {m.license}\n  {'':<14} {where}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from leanserve.engine.engine import LLM
    from leanserve.types import SamplingParams

    ensure_model(args.model)
    t0 = time.perf_counter()
    llm = LLM(args.model, **_engine_kwargs(args))
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - t0 - load_s
    print(out.outputs[0].text)
    n = len(out.outputs[0].token_ids)
    print(f"[{out.num_prompt_tokens} prompt tokens, {n} generated in {elapsed:.2f}s ({n / elapsed:.1f} tok/s), "
          f"model loaded in {load_s:.1f}s, finish: {out.outputs[0].finish_reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve", description="LLM inference at the lowest cost per token.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download built-in models into the model store")
    p.add_argument("names", nargs="+")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list built-in models and where they are")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate a continuation of a prompt (greedy by default)")
    p.add_argument("prompt")
    _add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_generate)

    for add in _optional_commands():
        add(sub)
    return parser


def _optional_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    adders = []
    try:
        from leanserve.bench.cli import add_parser as add_bench
        adders.append(add_bench)
    except ImportError:
        pass
    try:
        from leanserve.serve.cli import add_parser as add_serve
        adders.append(add_serve)
    except ImportError:
        pass
    try:
        from leanserve.cost.cli import add_parser as add_usage
        adders.append(add_usage)
    except ImportError:
        pass
    return adders


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"leanserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
