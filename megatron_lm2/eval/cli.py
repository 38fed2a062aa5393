"""lm2-eval: evaluate a checkpoint.

    lm2-eval babilong --hf DIR | --megatron CKPT [--tokenizer T]  --data ROOT  [--tasks ...]
    lm2-eval mmlu     --hf DIR | --megatron CKPT [--tokenizer T]  --data ROOT  [--shots 5]
    lm2-eval inspect  --megatron CKPT [--tokenizer T] --text "..." --out DIR
    lm2-eval make-babilong --out ROOT [--tasks ...] [--lengths ...] [--samples N]

docs/eval.md has the details and the data layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_lm2.eval.answers import TASKS
from megatron_lm2.eval.babilong import LENGTHS


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_model_flags(p: argparse.ArgumentParser, hf: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    if hf:
        group.add_argument("--hf", help="a Hugging Face model folder (e.g. an `lm2-convert to-hf` export)")
    group.add_argument("--megatron", help="a Megatron dist checkpoint directory (with lm2_config.json)")
    p.add_argument("--tokenizer", default=None,
                   help="Megatron backend: tokenizer.json / .model / directory / 'default'")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="HF backend: weights dtype")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="HF backend: allow the folder's own code")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args):
    from megatron_lm2.eval import backends

    if getattr(args, "hf", None):
        return backends.load_hf(args.hf, args.dtype, _device(args), args.trust_remote_code)
    from megatron_lm2.convert.megatron_io import ensure_single_process

    ensure_single_process()
    loaded = backends.load_megatron(args.megatron, args.tokenizer)
    if _device(args) != "cpu":
        loaded.model.to(_device(args))
    return loaded


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- babilong
def cmd_babilong(args) -> int:
    from megatron_lm2.eval.babilong import run_babilong
    from megatron_lm2.eval.decode import HFGenerator, MegatronGenerator

    tasks, lengths = _csv(args.tasks), _csv(args.lengths)
    loaded = _load(args)
    if loaded.kind == "hf":
        generate = HFGenerator(loaded.model, loaded.tokenizer, args.max_new_tokens)
    else:
        generate = MegatronGenerator(loaded.model, loaded.tokenizer, args.window, args.max_new_tokens)
    results = run_babilong(generate, args.data, tasks, lengths, args.output, args.limit)
    print(results.table())
    if args.output:
        print(f"per-sample outputs and summary.json in {args.output}")
    return 0


# ------------------------------------------------------------------------------------- mmlu
def cmd_mmlu(args) -> int:
    from megatron_lm2.eval.mmlu import HFScorer, MegatronScorer, load_mmlu, score_mmlu

    subjects = _csv(args.subjects) if args.subjects else None
    questions = load_mmlu(args.data, args.split, subjects)
    if args.limit:
        questions = questions[: args.limit]
    dev = load_mmlu(args.data, "dev", subjects) if args.shots else []
    loaded = _load(args)
    scorer = (HFScorer if loaded.kind == "hf" else MegatronScorer)(loaded.model, loaded.tokenizer)
    result = score_mmlu(scorer, questions, args.format, dev, args.shots)
    print(f"MMLU ({args.format}, {args.shots}-shot, {result.total} questions): "
          f"accuracy {result.accuracy:.2f}  macro {result.macro_accuracy:.2f}"
          + (f"  acc_norm {result.accuracy_norm:.2f}" if result.accuracy_norm is not None else ""))
    if args.output:
        _write_json(args.output, result.to_dict())
    return 0


# ---------------------------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    import torch

    from megatron_lm2.eval.inspect import inspect_memory, plot_gate_stats, plot_read_attention

    loaded = _load(args)
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = args.text
    ids = loaded.tokenizer.encode(text)[: args.max_tokens]
    if not ids:
        raise SystemExit("lm2-eval inspect: the text encodes to no tokens")
    tokens = torch.tensor([ids], device=next(loaded.model.parameters()).device)
    from megatron_lm2.model import attention_mask

    mask = attention_mask(len(ids), loaded.config.attention_window, tokens.device)
    report = inspect_memory(loaded.model, tokens, attention_mask=mask)
    os.makedirs(args.out, exist_ok=True)
    labels = [loaded.tokenizer.decode([i]) for i in ids] if len(ids) <= 40 else None
    plot_read_attention(report, os.path.join(args.out, "read_attention.png"), tokens=labels)
    plot_gate_stats(report.gates, os.path.join(args.out, "gates.png"))
    summary = {"tokens": len(ids), "gates": report.gates, "read_entropy_nats": report.entropy()}
    _write_json(os.path.join(args.out, "memory_report.json"), summary)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------- make-babilong
def cmd_make_babilong(args) -> int:
    from megatron_lm2.eval.babilong_gen import count_words, write_dataset

    count = count_words
    if args.tokenizer:
        from megatron_lm2.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        count = lambda text: len(tok.encode(text))  # noqa: E731
    files = write_dataset(args.out, _csv(args.tasks), _csv(args.lengths), args.samples, args.seed,
                          count_tokens=count, filler_file=args.filler)
    print(f"wrote {len(files)} files under {args.out}/data/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm2-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("babilong", help="BABILong qa1-qa10 with the benchmark's prompts and answer rule")
    _add_model_flags(p)
    p.add_argument("--data", required=True, help="local BABILong copy (parquet / json / save_to_disk layouts)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default=",".join(LENGTHS))
    p.add_argument("--limit", type=int, default=None, help="samples per task and length (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="greedy tokens per answer (benchmark: 20)")
    p.add_argument("--window", type=int, default=None,
                   help="Megatron backend: tokens per forward call (default: attention_window or seq_length)")
    p.add_argument("--output", default=None, help="directory for per-sample outputs and summary.json (resumable)")
    p.set_defaults(func=cmd_babilong)

    p = sub.add_parser("mmlu", help="multiple choice by log-likelihood (paper Table 2)")
    _add_model_flags(p)
    p.add_argument("--data", required=True, help="local MMLU copy (original csv tarball or hub parquet)")
    p.add_argument("--split", default="test")
    p.add_argument("--format", default="letters", choices=("letters", "cloze"))
    p.add_argument("--shots", type=int, default=0, help="few-shot examples from the dev split")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON file for the result")
    p.set_defaults(func=cmd_mmlu)

    p = sub.add_parser("inspect", help="memory gate statistics and read-attention heatmaps (PNG)")
    _add_model_flags(p, hf=False)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text")
    text.add_argument("--text-file")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-babilong", help="write generated BABILong-style data (no download)")
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default="0k,1k,2k,4k")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="count lengths in this tokenizer's tokens (default: words)")
    p.add_argument("--filler", default=None, help="a text file whose sentences fill the context")
    p.set_defaults(func=cmd_make_babilong)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"lm2-eval {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
