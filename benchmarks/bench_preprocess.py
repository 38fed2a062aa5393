"""Throughput of lm2-preprocess vs the approach of Megatron-LM's tools/preprocess_data.py.

The baseline is our own re-statement of that tool's design (not its code): a
``multiprocessing.Pool`` whose workers ``json.loads`` one line and tokenize ONE document per call
(``pool.imap(encode, lines, 32)``), the main process appending each document to an
``IndexedDatasetBuilder`` with ``add_document``. For a HF tokenizer the per-document call is the
one Megatron's HuggingFaceTokenizer makes (``transformers`` tokenizer ``__call__``); a second
row calls ``tokenizers.Tokenizer.encode`` directly, the cheapest per-document path.

Both read the same generated jsonl with the same tokenizer and the same number of worker
processes. "tok / CPU-s" divides tokens by the CPU time of the whole process tree (main + workers,
user + sys): the per-core figure, and robust to other load on a shared machine. Peak RSS is
measured for lm2-preprocess on a ~1 GB jsonl (generated in a temp dir and deleted after).

    python benchmarks/bench_preprocess.py                     # full table (~10 min on 2 cores)
    python benchmarks/bench_preprocess.py --documents 300 --rss-gb 0   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# --- the Megatron-LM-style baseline (our re-statement) ------------------------------------------

_TOK = {}


def _baseline_init(kind: str, path: str, eod: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=path)
        _TOK["encode"] = sp.encode_as_ids
    elif kind == "transformers":
        from transformers import PreTrainedTokenizerFast

        tt = PreTrainedTokenizerFast(tokenizer_file=path)
        _TOK["encode"] = lambda text: tt(text, add_special_tokens=False).input_ids
    else:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(path)
        _TOK["encode"] = lambda text: tok.encode(text, add_special_tokens=False).ids
    _TOK["eod"] = eod


def _baseline_encode(line: str):
    ids = _TOK["encode"](json.loads(line)["text"])
    ids.append(_TOK["eod"])
    return ids, len(line)


def run_baseline(src: str, out: str, kind: str, tokenizer_path: str, workers: int) -> dict:
    from multiprocessing import Pool

    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_lm2.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    builder = IndexedDatasetBuilder(out + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    tokens = docs = 0
    with open(src, encoding="utf-8") as fin, Pool(workers, _baseline_init, (kind, tokenizer_path, tok.eod)) as pool:
        for ids, _ in pool.imap(_baseline_encode, fin, 32):
            builder.add_document(np.asarray(ids), [len(ids)])
            tokens += len(ids)
            docs += 1
    builder.finalize(out + ".idx")
    return {"tokens": tokens, "documents": docs, "wall": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu0}


def run_ours(src: str, out: str, tokenizer_path: str, workers: int) -> dict:
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imported before timing, as in the baseline)

    from megatron_lm2.preprocess.pipeline import PreprocessConfig, run

    start, cpu0 = time.perf_counter(), _cpu_seconds()
    manifest, stats = run(PreprocessConfig(inputs=[src], output=out, tokenizer=tokenizer_path, workers=workers,
                                           progress=False))
    return {"tokens": manifest["totals"]["tokens"], "documents": manifest["totals"]["documents"],
            "wall": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu0}


# --- driver --------------------------------------------------------------------------------------

def _child(args: list[str]) -> dict:
    """Each measurement in a fresh interpreter, so CPU accounting covers exactly one run."""
    proc = subprocess.run([sys.executable, __file__, "--_child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss(argv: list[str]) -> tuple[float, float, float]:
    """(wall s, peak RSS of the process tree summed, peak RSS of the main process) in GiB."""
    import psutil

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    main = psutil.Process(proc.pid)
    peak_total = peak_main = 0
    start = time.perf_counter()
    stop = threading.Event()

    def sample():
        nonlocal peak_total, peak_main
        while not stop.is_set():
            try:
                procs = [main, *main.children(recursive=True)]
                rss = [p.memory_info().rss for p in procs]
                peak_total, peak_main = max(peak_total, sum(rss)), max(peak_main, rss[0])
            except psutil.Error:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-3000:])
    return time.perf_counter() - start, peak_total / 2**30, peak_main / 2**30


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        method, src, out, kind, tok, workers = sys.argv[2:8]
        if method == "ours":
            result = run_ours(src, out, tok, int(workers))
        else:
            result = run_baseline(src, out, kind, tok, int(workers))
        print(json.dumps(result))
        return

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=1200, help="long stories per corpus (default 1200)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rss-gb", type=float, default=1.0, help="size of the peak-RSS input in GB (0: skip)")
    p.add_argument("--skip-table", action="store_true", help="only the peak-RSS measurement")
    p.add_argument("--tmp", default=tempfile.gettempdir())
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_", dir=args.tmp))
    try:
        if not args.skip_table:
            _throughput_table(args, work)
        if args.rss_gb > 0:
            _peak_rss_line(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _throughput_table(args, work: Path) -> None:
    from megatron_lm2.data.synthetic_corpus import CorpusConfig, iter_documents, write_corpus
    from megatron_lm2.tokenizer import DEFAULT_TOKENIZER
    from megatron_lm2.tokenizer.train import train_hf_bpe

    corpora = {
        # ~3.2k tokens per document with the embedded tokenizer
        "long stories": write_corpus(work, args.documents, 0, filename="long.jsonl"),
        # ~420 tokens per document, closer to web text's short documents
        "short docs": write_corpus(work, args.documents * 6, 1, CorpusConfig(filler_words=300, events=4),
                                   filename="short.jsonl"),
        # ~80 tokens per document: where the per-call overhead of the baseline shows most
        "tiny docs": write_corpus(work, args.documents * 30, 2,
                                  CorpusConfig(filler_words=40, people=2, objects=1, events=2, questions=1),
                                  filename="tiny.jsonl"),
    }
    (work / "bpe").mkdir()
    (work / "bpe" / "tokenizer.json").write_text(
        train_hf_bpe((d.text for d in iter_documents(300, 99)), 8192))
    tokenizers = {"SentencePiece 2k (embedded)": ("sentencepiece", str(DEFAULT_TOKENIZER)),
                  "HF byte-level BPE 8k": ("hf", str(work / "bpe" / "tokenizer.json"))}

    rows = []
    for corpus_name, src in corpora.items():
        for tok_name, (kind, path) in tokenizers.items():
            runs = [("lm2-preprocess (batched)", "ours", kind)]
            if kind == "sentencepiece":
                runs.append(("Megatron-style pool, 1 doc/call", "baseline", "sentencepiece"))
            else:
                runs.append(("Megatron-style pool, 1 doc/call (transformers)", "baseline", "transformers"))
                runs.append(("Megatron-style pool, 1 doc/call (tokenizers)", "baseline", "tokenizers"))
            results = []
            for label, method, k in runs:
                out = work / f"out_{len(rows)}_{len(results)}"
                r = _child([method, str(src), str(out), k, path, str(args.workers)])
                shutil.rmtree(out, ignore_errors=True)
                for f in work.glob(f"out_{len(rows)}_{len(results)}.*"):
                    f.unlink()
                results.append((label, r))
            ours = results[0][1]["tokens"] / results[0][1]["cpu"]
            for label, r in results:
                rows.append((corpus_name, tok_name, label, r, ours / (r["tokens"] / r["cpu"])))

    print(f"\nworkers={args.workers}, cores={os.cpu_count()}, load avg before={os.getloadavg()[0]:.1f}\n")
    header = ("corpus", "tokenizer", "method", "tokens", "wall s", "tok/s", "tok/s/worker", "tok/CPU-s",
              "ours vs this (CPU)")
    table = [header]
    for corpus_name, tok_name, label, r, ratio in rows:
        table.append((corpus_name, tok_name, label, f"{r['tokens']:,}", f"{r['wall']:.1f}",
                      f"{r['tokens'] / r['wall']:,.0f}", f"{r['tokens'] / r['wall'] / args.workers:,.0f}",
                      f"{r['tokens'] / r['cpu']:,.0f}", f"{ratio:.2f}x"))
    _print_markdown(table)


def _peak_rss_line(args, work: Path) -> None:
    from megatron_lm2.data.synthetic_corpus import write_corpus

    big = work / "big.jsonl"
    n = int(args.rss_gb * 1e9 / 17_700)  # ~17.7 kB per default story
    write_corpus(work, n, 7, filename="big.jsonl")
    size = big.stat().st_size / 1e9
    wall, total, main_rss = peak_rss([sys.executable, "-m", "megatron_lm2.preprocess.cli", "--input", str(big),
                                      "--output", str(work / "big_out"), "--workers", str(args.workers),
                                      "--no-progress"])
    manifest = json.loads((work / "big_out" / "manifest.json").read_text())
    print(f"\npeak RSS, lm2-preprocess on a {size:.2f} GB jsonl ({manifest['totals']['documents']:,} docs, "
          f"{manifest['totals']['tokens']:,} tokens, {args.workers} workers, {wall:.0f} s): "
          f"{total:.2f} GiB for the whole process tree, {main_rss:.2f} GiB for the main process")


def _print_markdown(table) -> None:
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
