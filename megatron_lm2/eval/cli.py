"""lm2-eval: evaluate a checkpoint.

    lm2-eval babilong --hf DIR | --megatron CKPT [--tokenizer T]  --data ROOT  [--tasks ...]
                      [--prompt-revision 2024-06-04] [--bos auto|on|off]
    lm2-eval mmlu     --hf DIR | --megatron CKPT [--tokenizer T]  --data ROOT  [--shots 5]
    lm2-eval inspect  --megatron CKPT [--tokenizer T] --text "..." --out DIR
    lm2-eval make-babilong --out ROOT [--tasks ...] [--lengths ...] [--samples N]

Bad input (a flag, a file, a record) ends with one line naming it and exit code 2; --debug or
LM2_DEBUG=1 shows the traceback. docs/eval.md has the details and the data layouts.
Results (tables, JSON summaries) are printed: they are the command's output, not a log
(the trainer logs through megatron_lm2.logs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_lm2.cli_args import ArgumentParser, quiet_library_warnings
from megatron_lm2.cli_errors import UserInputError, cli_entry
from megatron_lm2.eval.answers import TASKS
from megatron_lm2.eval.babilong import LENGTHS
from megatron_lm2.eval.bos import BOS_CHOICES
from megatron_lm2.eval.prompts import DEFAULT_REVISION, PROMPT_PARTS, PROMPT_REVISIONS, parse_prompt_parts
from megatron_lm2.fileio import write_json_atomic


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
    p.add_argument("--bos", default="auto", choices=BOS_CHOICES,
                   help="a BOS token before every prompt. auto (default) matches how the model was trained: off "
                        "for LM2 (pretrained on documents with no BOS), the tokenizer's default for other HF models "
                        "(as the benchmark's runner)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (also LM2_DEBUG=1)")
    p.add_argument("--allow-unverified-checkpoint", action="store_true",
                   help="Megatron backend: load a checkpoint that has no lm2_integrity.json (written before the "
                        "record existed), unverified; without it such a checkpoint is refused")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_path(args) -> None:
    """The model's path, checked before torch and the model code are imported (a wrong path then
    costs no import time, and no library warnings come before the one error line)."""
    hf = getattr(args, "hf", None)
    if hf:
        if not os.path.isdir(hf):
            raise UserInputError(f"--hf {hf}: no such directory")
        if not os.path.isfile(os.path.join(hf, "config.json")):
            raise UserInputError(f"--hf {hf}: no config.json there (not a Hugging Face model folder)")
    elif not os.path.isdir(args.megatron):
        raise UserInputError(f"--megatron {args.megatron}: no such checkpoint directory")


def _load(args):
    from megatron_lm2.eval import backends

    if getattr(args, "hf", None):
        return backends.load_hf(args.hf, args.dtype, _device(args), args.trust_remote_code)
    from megatron_lm2.convert.megatron_io import ensure_single_process

    ensure_single_process()
    loaded = backends.load_megatron(args.megatron, args.tokenizer,
                                    allow_unverified=getattr(args, "allow_unverified_checkpoint", False))
    if _device(args) != "cpu":
        loaded.model.to(_device(args))
    return loaded


def _is_lm2(args) -> bool:
    """A Megatron checkpoint of this project, or an HF folder whose config says model_type lm2
    (read from config.json, before anything is loaded)."""
    if not getattr(args, "hf", None):
        return True
    path = os.path.join(args.hf, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "lm2"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise UserInputError(f"--hf {args.hf}: {path} is not a JSON object ({exc})") from exc


def _bos(args):
    from megatron_lm2.eval.bos import resolve_bos

    return resolve_bos(args.bos, _is_lm2(args))


def _csv_of(flag: str, text: str, known: Sequence[str]) -> list[str]:
    items = _csv(text)
    unknown = [t for t in items if t not in known]
    if not items or unknown:
        raise UserInputError(f"{flag} {text!r}: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(known)}")
    return items


def _write_json(path: str, obj) -> None:
    write_json_atomic(path, obj, indent=2, fsync=False, unique=True)


# --------------------------------------------------------------------------------- babilong
def cmd_babilong(args) -> int:
    from megatron_lm2.eval.babilong import check_output_dir, protocol_header, run_babilong
    from megatron_lm2.eval.babilong_data import load_split

    tasks, lengths = _csv_of("--tasks", args.tasks, TASKS), _csv(args.lengths)
    prompt_parts = parse_prompt_parts(args.prompt_parts)
    if not lengths:
        raise UserInputError("--lengths: no length given")
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens), ("--window", args.window)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} {value}: must be at least 1")
    for length in lengths:  # every cell's data is readable before the model is loaded
        for task in tasks:
            load_split(args.data, task, length, args.limit)
    _check_model_path(args)
    bos, bos_line = _bos(args)
    header = protocol_header(args.prompt_revision, bos_line, args.max_new_tokens, prompt_parts)
    if args.output:  # a protocol clash with earlier cells is found before the model is loaded
        check_output_dir(args.output, header)
    from megatron_lm2.eval.decode import HFGenerator, MegatronGenerator

    loaded = _load(args)
    if loaded.kind == "hf":
        generate = HFGenerator(loaded.model, loaded.tokenizer, args.max_new_tokens, bos=bos)
    else:
        generate = MegatronGenerator(loaded.model, loaded.tokenizer, args.window, args.max_new_tokens, bos=bool(bos))
    results = run_babilong(generate, args.data, tasks, lengths, args.output, args.limit,
                           revision=args.prompt_revision, header=header, prompt_parts=prompt_parts)
    print(results.table())
    if args.output:
        print(f"per-sample outputs and summary.json in {args.output}")
    return 0


# ------------------------------------------------------------------------------------- mmlu
def cmd_mmlu(args) -> int:
    from megatron_lm2.eval.mmlu_data import load_mmlu

    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        raise UserInputError(f"--shots {args.shots} / --limit {args.limit}: shots must be >= 0, limit >= 1")
    subjects = _csv(args.subjects) if args.subjects else None
    questions = load_mmlu(args.data, args.split, subjects)
    if args.limit:
        questions = questions[: args.limit]
    if not questions:
        raise UserInputError(f"--data {args.data}: no MMLU {args.split} questions"
                             + (f" for --subjects {args.subjects}" if subjects else ""))
    dev = load_mmlu(args.data, "dev", subjects) if args.shots else []
    _check_model_path(args)
    bos, bos_line = _bos(args)
    from megatron_lm2.eval.mmlu import HFScorer, MegatronScorer, leading_special_ids, score_mmlu

    loaded = _load(args)
    if loaded.kind == "hf":
        prefix = leading_special_ids(loaded.tokenizer) if bos is None else (
            [loaded.tokenizer.bos_token_id] if bos else [])
        if bos and loaded.tokenizer.bos_token_id is None:
            raise UserInputError("--bos on: the tokenizer defines no BOS token")
        scorer = HFScorer(loaded.model, loaded.tokenizer, prefix_ids=prefix)
    else:
        if bos and loaded.tokenizer.bos is None:
            raise UserInputError("--bos on: the tokenizer defines no BOS token")
        scorer = MegatronScorer(loaded.model, loaded.tokenizer, prefix_ids=[loaded.tokenizer.bos] if bos else [])
    result = score_mmlu(scorer, questions, args.format, dev, args.shots, header={"bos": bos_line})
    print("\n".join(f"{k}: {v}" for k, v in result.header.items()))
    print(f"MMLU ({args.format}, {args.shots}-shot, {result.total} questions): "
          f"accuracy {result.accuracy:.2f}  macro {result.macro_accuracy:.2f}"
          + (f"  acc_norm {result.accuracy_norm:.2f}  acc_bytes {result.accuracy_bytes:.2f}"
             if result.accuracy_norm is not None else ""))
    if args.output:
        _write_json(args.output, result.to_dict())
    return 0


# ---------------------------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    _check_model_path(args)
    if args.text_file:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise UserInputError(f"--text-file {args.text_file}: not UTF-8 text ({exc.reason})") from exc
    else:
        text = args.text
    import torch

    from megatron_lm2.eval.inspect import inspect_memory, plot_gate_stats, plot_read_attention

    loaded = _load(args)
    ids = loaded.tokenizer.encode(text)[: args.max_tokens]
    if not ids:
        raise UserInputError("--text/--text-file: the text encodes to no tokens")
    tokens = torch.tensor([ids], device=next(loaded.model.parameters()).device)
    report = inspect_memory(loaded.model, tokens)  # the model builds its attention-window mask
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
    from megatron_lm2.eval.babilong_gen import count_words, parse_length, write_dataset

    tasks, lengths = _csv_of("--tasks", args.tasks, TASKS), _csv(args.lengths)
    for length in lengths:
        try:
            parse_length(length)
        except ValueError as exc:
            raise UserInputError(f"--lengths {length!r}: {exc}") from exc
    if args.samples < 1:
        raise UserInputError(f"--samples {args.samples}: must be at least 1")
    count = count_words
    if args.tokenizer:
        from megatron_lm2.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        count = lambda text: len(tok.encode(text))  # noqa: E731
    files = write_dataset(args.out, tasks, lengths, args.samples, args.seed,
                          count_tokens=count, filler_file=args.filler)
    print(f"wrote {len(files)} files under {args.out}/data/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lm2-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--prompt-revision", default=DEFAULT_REVISION, choices=PROMPT_REVISIONS,
                   help=f"which revision of the benchmark's prompt texts (default {DEFAULT_REVISION}, its current "
                        "one; 2024-05-15: its first draft, to compare with runs that used it)")
    p.add_argument("--prompt-parts", default=",".join(PROMPT_PARTS),
                   help="which parts of the benchmark's prompt to use, as its runner's --use_instruction / "
                        "--use_examples / --use_post_prompt: a comma list of " + ", ".join(PROMPT_PARTS)
                        + " (default: all), or none")
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
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (also LM2_DEBUG=1)")
    p.set_defaults(func=cmd_make_babilong)
    return parser


@cli_entry("lm2-eval")
def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_library_warnings()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
