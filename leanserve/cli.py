"""`leanserve pull | models | generate | quantize | serve | bench | usage | eval | plan`: argument parsing and one-line errors."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from leanserve.batch.cli import add_parser as add_batch
from leanserve.bench.cli import add_parser as add_bench
from leanserve.cli_common import CLIError, add_engine_args, engine_config, ensure_model
from leanserve.cost.cli import add_parser as add_usage
from leanserve.eval.cli import add_parser as add_eval
from leanserve.plan.cli import add_parser as add_plan
from leanserve.serve.cli import add_parser as add_serve

# Every command's module is imported directly: a broken import fails `leanserve` loudly instead of
# hiding the command. Each module keeps its heavy imports (torch, the model) inside its commands.
COMMANDS = (add_serve, add_batch, add_bench, add_usage, add_eval, add_plan)


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

    config = engine_config(args)  # a bad value fails now, before a pull or a load
    given = {k: getattr(args, k) for k in ("top_p", "top_k", "seed") if getattr(args, k) is not None}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos,
                            **given)
    ensure_model(config.model)
    t0 = time.perf_counter()
    llm = LLM(**vars(config))
    load_s = time.perf_counter() - t0
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


def cmd_quantize(args: argparse.Namespace) -> int:
    from leanserve.model.gguf_write import write_gguf

    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if not (src / "config.json").is_file() or not any(src.glob("*.safetensors")) or not (src / "tokenizer.json").is_file():
        raise CLIError(f"{src} is not an HF model folder (config.json, *.safetensors and tokenizer.json)")
    if dst.suffix != ".gguf":
        raise CLIError(f"the destination must end in .gguf, got {dst}")
    if dst.exists() and not args.force:
        raise CLIError(f"{dst} exists (--force to overwrite)")
    write_gguf(src, dst, args.type, log=print)
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
    add_engine_args(p)
    s = p.add_argument_group("sampling (unset: SamplingParams' defaults)")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: 0)")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="write a float HF Llama model as a GGUF file in Q8_0 or Q4_1 blocks",
                       description="Quantize an HF folder (Llama architecture, BPE tokenizer) into a GGUF file that "
                                   "leanserve and llama.cpp load: the blocks --quantization makes at load, llama.cpp's "
                                   "tensor names and metadata, and DST.tokenizer.json beside it (docs/quantization.md).")
    p.add_argument("src", help="HF model folder")
    p.add_argument("dst", help="the .gguf file to write")
    p.add_argument("--type", choices=("int8", "int4"), default="int8",
                   help="int8: Q8_0; int4: Q4_1 with the LM head in Q8_0 (default int8)")
    p.add_argument("--force", action="store_true", help="overwrite DST")
    p.set_defaults(func=cmd_quantize)

    for add in COMMANDS:
        add(sub)
    return parser


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
