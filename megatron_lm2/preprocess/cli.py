"""``lm2-preprocess``: SmolLM-corpus parquet / jsonl -> Megatron-core indexed shards + manifest.

Examples::

    lm2-preprocess --input /data/smollm-corpus --subsets cosmopedia-v2,fineweb-edu-dedup \\
        --tokenizer /models/SmolLM-1.7B/tokenizer.json --output /data/lm2-shards --blend paper
    mpiexec -n 8 lm2-preprocess ...          # ranks split the input files; same shards as 1 rank
    lm2-preprocess --input data/raw/synthetic.jsonl --output data/shards   # embedded tokenizer

Rerunning the same command after an interruption resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from megatron_lm2.cli_args import ArgumentParser
from megatron_lm2.cli_errors import UserInputError, cli_entry
from megatron_lm2.preprocess.blend import parse_weights, write_blend
from megatron_lm2.preprocess.pipeline import PreprocessConfig, RankStats, run
from megatron_lm2.preprocess.readers import InputError
from megatron_lm2.tokenizer.encoders import FAST_ENCODERS


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="lm2-preprocess",
        description="Tokenize SmolLM-corpus parquet or jsonl(.gz/.zst) into Megatron-core indexed shards "
                    "(.bin/.idx) with a manifest; resumable, parallel, multi-node with mpiexec.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::")[1])
    p.add_argument("--input", action="append", required=True, metavar="[SUBSET=]PATH",
                   help="a .parquet/.jsonl/.jsonl.gz/.jsonl.zst file, a directory of them, or a SmolLM-corpus "
                        "root (<subset>/train-*.parquet); repeatable")
    p.add_argument("--subsets", help="comma-separated subsets to take from a corpus root, in this order "
                                     "(e.g. cosmopedia-v2,fineweb-edu-dedup; default: all)")
    p.add_argument("--output", required=True, help="output directory (shards, manifest.json, blend.json)")
    p.add_argument("--tokenizer", default="default",
                   help="tokenizer.json, SentencePiece .model, a directory holding one, or 'default' "
                        "(the embedded 2k SentencePiece model)")
    p.add_argument("--eod-token", help="end-of-document token (default: <|endoftext|>, <|end_of_text|>, </s>, "
                                       "<eos>, or the SentencePiece eos)")
    p.add_argument("--json-key", default="text", help="text field of jsonl rows and parquet column (default text)")
    p.add_argument("--shard-tokens", type=int, default=1_000_000_000,
                   help="token budget per shard; a shard closes after the document reaching it (default 1e9)")
    p.add_argument("--workers", type=int, default=None,
                   help="encoding processes per rank (default: CPU cores / ranks on the node; 0 = in-process)")
    p.add_argument("--rows-per-task", type=int, default=1024, help="rows per worker task (bounds memory)")
    p.add_argument("--blend", default="tokens",
                   help="blend.json weights: 'tokens' (natural mix), 'paper' (28B Cosmopedia-v2 : 220B "
                        "FineWeb-Edu), SUBSET=W,SUBSET=W, or 'none' (default tokens)")
    p.add_argument("--encoder", default="auto", choices=["auto", "hf", "reference", *FAST_ENCODERS],
                   help="auto (default): a fast encoder when installed (pip install -e .[fast]) and equal to the "
                        "reference on each file's sample, else the reference; hf / reference: the tokenizer's own "
                        "library only; " + "/".join(FAST_ENCODERS) + ": that one, and stop if a sample differs")
    p.add_argument("--verify-mb", type=float, default=3.0,
                   help="per input file, MB of text (1/3 first documents, 2/3 random ones) encoded by both the "
                        "fast and the reference encoder (default 3)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="do not fsync shards and records (a killed process still loses nothing; a power loss may)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="tracebacks for errors (also LM2_DEBUG=1)")
    return p


@cli_entry("lm2-preprocess")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, ok in (("--shard-tokens", args.shard_tokens, args.shard_tokens >= 1),
                            ("--rows-per-task", args.rows_per_task, args.rows_per_task >= 1),
                            ("--workers", args.workers, args.workers is None or args.workers >= 0),
                            ("--verify-mb", args.verify_mb, 0 < args.verify_mb < float("inf"))):
        if not ok:
            need = {"--workers": ">= 0", "--verify-mb": "> 0 (to skip the fast encoder, use --encoder hf)"}
            raise UserInputError(f"{flag} {value}: must be {need.get(flag, '>= 1')}")
    blend = None if args.blend == "none" else parse_weights(args.blend)
    cfg = PreprocessConfig(
        inputs=args.input, output=args.output, tokenizer=args.tokenizer, eod_token=args.eod_token,
        json_key=args.json_key, subsets=args.subsets.split(",") if args.subsets else None,
        shard_tokens=args.shard_tokens, workers=args.workers, rows_per_task=args.rows_per_task,
        encoder=args.encoder, verify_first_bytes=int(args.verify_mb * 1e6 / 3),
        verify_random_bytes=int(args.verify_mb * 1e6 * 2 / 3), fsync=args.fsync,
        progress=not args.no_progress, command=["lm2-preprocess", *(sys.argv[1:] if argv is None else argv)])
    manifest, stats = run(cfg)
    if manifest is None:  # an MPI rank other than 0
        return 0
    print(format_summary(manifest, stats))
    problems = file_problems(manifest)
    if manifest["totals"]["documents"] == 0:
        raise InputError("no documents written: " + "; ".join(problems or ["the inputs hold no rows"]))
    for line in problems:
        print(f"lm2-preprocess: warning: {line}", file=sys.stderr)
    if blend is not None:
        write_blend(f"{args.output}/blend.json", manifest, blend)
    return 0


def file_problems(manifest: dict) -> list[str]:
    """One line per input file that could not be read whole or gave no document, e.g.
    "x.jsonl: 0 documents written — 412 rows skipped (bad_json 380, invalid_utf8 32)"."""
    lines = []
    for f in manifest["files"]:
        problems = f.get("problems") or []
        name = f["path"]
        for problem in problems[:3]:
            lines.append(f"{name}: {problem}")
        if f["documents"] == 0 and not any(f["skipped"].get(r) for r in ("corrupt_file", "missing_column")):
            skipped = sum(f["skipped"].values())
            detail = ", ".join(f"{k} {v:,}" for k, v in sorted(f["skipped"].items(), key=lambda kv: -kv[1]))
            lines.append(f"{name}: 0 documents written — {skipped:,} rows skipped ({detail})" if skipped
                         else f"{name}: 0 documents written — the file holds no rows")
    return lines


def format_summary(manifest: dict, stats: RankStats) -> str:
    rows = [("subset", "files", "documents", "tokens", "shards", "skipped")]
    for name, s in manifest["subsets"].items():
        rows.append((name, s["files"], s["documents"], s["tokens"], s["shards"], s["skipped"]))
    t = manifest["totals"]
    rows.append(("total", t["files"], t["documents"], t["tokens"], t["shards"], sum(t["skipped"].values())))
    cells = [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])]
    secs = max(stats.seconds, 1e-9)
    out.append(f"this run: {stats.documents:,} documents, {stats.tokens:,} tokens in {stats.seconds:.1f} s "
               f"({stats.documents / secs:,.0f} docs/s, {stats.tokens / secs:,.0f} tokens/s); "
               f"tokenizer {manifest['tokenizer']['name']} (vocab {manifest['tokenizer']['vocab_size']:,}, "
               f"eod {manifest['tokenizer']['eod']}), dtype {manifest['dtype']}")
    encoders = manifest.get("encoders") or {}
    if encoders:
        out.append("shards by encoder: " + ", ".join(f"{name or 'unrecorded'} {n}" for name, n in encoders.items())
                   + f" ({manifest.get('last_run', {}).get('fast_encoder_note', '')})")
    if t["skipped"]:
        out.append("skipped rows: " + ", ".join(f"{k}={v:,}" for k, v in t["skipped"].items()))
        for entry in manifest["skipped_rows"][:20]:
            out.append(f"  {entry['file']}:{entry['row']}  {entry['reason']}")
        more = sum(t["skipped"].values()) - min(20, len(manifest["skipped_rows"]))
        if more > 0:
            out.append(f"  ... {more:,} more (listed in manifest.json: skipped_rows)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
