"""lm2-preprocess with each encoder, the raw encoders alone, and Megatron-LM's own
tools/preprocess_data.py, side by side on one jsonl and one byte-level BPE tokenizer.json.

Every row runs in a fresh process tree; "tok/CPU-s" divides tokens by the CPU time (user + sys)
of that whole tree (main + workers), the per-core figure that other load on a shared machine
disturbs least; peak RSS is the process tree's, sampled every 0.1 s with psutil. "same stream"
compares the token stream (every document and its EOD, in order) with lm2-preprocess --encoder hf.

    python benchmarks/bench_preprocess.py                                 # ~40 MB corpus, table
    MEGATRON_LM=/path/to/Megatron-LM python benchmarks/bench_preprocess.py # + Megatron-LM's tool
    python benchmarks/bench_preprocess.py --rss 0.1,2                     # + peak RSS at 100 MB / 2 GB
    # peak RSS vs input size, one size per run, in the background, rows kept as they finish:
    for gb in 0.1 0.5 1 2; do nice -n 5 python benchmarks/bench_preprocess.py --mb 5 --styles gpt2-style \
        --skip-table --rss $gb --rss-log /tmp/rss.jsonl; done
    python benchmarks/bench_preprocess.py --components                    # + per-stage costs

Megatron-LM is never vendored. Get the tool and its `megatron` package with git (the tag that
matches the installed megatron-core keeps megatron.core identical):

    git clone --depth 1 --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM /tmp/megatron-lm

Its `megatron.training` imports triton at import time (batch-invariant kernels) although
preprocessing never calls it; on a CPU box without triton this script runs the tool through a
wrapper that registers an empty stand-in for that one module (see ``_MEGATRON_WRAPPER``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_MEGATRON_WRAPPER = '''
import runpy, sys, types
name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
stub = types.ModuleType(name)
def _unavailable(*args, **kwargs):
    raise RuntimeError("batch-invariant kernels need triton, which this machine lacks")
stub.enable_batch_invariant_mode = stub.disable_batch_invariant_mode = stub.set_batch_invariant_mode = _unavailable
stub.is_batch_invariant_mode_enabled = lambda: False
try:
    import triton  # noqa: F401  (a machine with triton needs no stand-in)
except ImportError:
    sys.modules[name] = stub
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# --- measuring a process tree ---------------------------------------------------------------------

def measure(argv: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run argv; wall seconds, CPU seconds of the whole tree, peak RSS of the tree (GiB)."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    root = psutil.Process(proc.pid)
    peak = 0
    peak_by_pid: dict[int, int] = {}  # each process's own peak RSS
    seen_cpu: dict[int, float] = {}  # last CPU time seen per process (covers children nobody waits for)
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            total = 0
            for p in [root, *_children(root)]:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    peak_by_pid[p.pid] = max(peak_by_pid.get(p.pid, 0), rss)
                    t = p.cpu_times()
                    seen_cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            peak = max(peak, total)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children and their children
    cpu = max((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), sum(seen_cpu.values()))
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    children = [v for pid, v in peak_by_pid.items() if pid != proc.pid]
    return {"wall": wall, "cpu": cpu, "rss": peak / 2**30, "stdout": out.decode(),
            "rss_parent": peak_by_pid.get(proc.pid, 0) / 2**20, "rss_worker": max(children, default=0) / 2**20}


def _children(root):
    import psutil

    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


# --- corpora and tokenizer ------------------------------------------------------------------------

def write_corpus(path: Path, megabytes: float, seed: int, unique_words: float = 0.0) -> int:
    """Synthetic long stories as jsonl; ``unique_words`` > 0 appends that fraction of fresh random
    words to each document (text no encoder cache has seen: what makes a cache grow)."""
    import numpy as np

    from megatron_lm2.data.synthetic_corpus import iter_documents

    base = [d.text for d in iter_documents(400, seed)]
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    target = int(megabytes * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = base[docs % len(base)]
            if unique_words:
                n = int(len(text) * unique_words / 8)
                letters = alphabet[rng.integers(0, 26, size=(n, 7))]
                words = np.concatenate([letters, np.full((n, 1), 32, np.uint8)], axis=1).tobytes().decode()
                text = text + " " + words
            line = json.dumps({"text": text, "id": docs}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


TOKENIZER_STYLES = {
    "gpt2-style": "byte-level BPE as `lm2-train-tokenizer --kind hf-bpe` makes it (ByteLevel pre-tokenizer, GPT-2 regex)",
    "smollm-style": "byte-level BPE with SmolLM's pre-tokenizer (Sequence: Digits(individual) then ByteLevel)",
}


def train_tokenizer(out_dir: Path, corpus: Path, vocab: int, style: str) -> Path:
    """A byte-level BPE tokenizer.json trained here on the corpus (no hub downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_lm2.tokenizer.train import train_hf_bpe

    texts = []
    with open(corpus, encoding="utf-8") as f:
        for line, _ in zip(f, range(300)):
            texts.append(json.loads(line)["text"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if style == "gpt2-style":
        (out_dir / "tokenizer.json").write_text(train_hf_bpe(texts, vocab))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.save(str(out_dir / "tokenizer.json"))
    # what transformers' AutoTokenizer (Megatron-LM's HuggingFaceTokenizer) needs besides it
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "model_max_length": 10**9}))
    return out_dir / "tokenizer.json"


# --- the rows ---------------------------------------------------------------------------------------

def stream_digest(bin_paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in bin_paths:
        digest.update(p.read_bytes())
    return digest.hexdigest()


def lm2_row(src: Path, tok: Path, out: Path, workers: int, *extra: str) -> dict:
    r = measure([sys.executable, "-m", "megatron_lm2.preprocess.cli", "--input", str(src), "--output", str(out),
                 "--tokenizer", str(tok), "--workers", str(workers), "--no-progress", "--blend", "none", *extra],
                env={**os.environ, "OMP_NUM_THREADS": "1"})
    manifest = json.loads((out / "manifest.json").read_text())
    r["tokens"] = manifest["totals"]["tokens"]
    r["stream"] = stream_digest([out / (s["prefix"] + ".bin") for s in manifest["shards"]])
    r["encoders"] = manifest["encoders"]
    r["verify_s"] = sum((f.get("verification") or {}).get("seconds", 0.0) for f in manifest["files"])
    return r


_RAW = r'''
import json, os, resource, sys, hashlib
os.environ["RAYON_NUM_THREADS"] = "1"; os.environ["TOKENIZERS_PARALLELISM"] = "false"
import numpy as np
kind, src, tok = sys.argv[1:4]
texts = [json.loads(line)["text"] for line in open(src, encoding="utf-8")]
if kind == "tokenizers":
    import tokenizers
    t = tokenizers.Tokenizer.from_file(tok)
    def run(batch):
        return [np.asarray(e.ids, np.uint32) for e in t.encode_batch_fast(batch, add_special_tokens=False)]
elif kind == "fastokens":
    import fastokens
    t = fastokens.Tokenizer.from_file(tok); t.enable_segment_cache(0)
    def run(batch):
        ids, off = t.encode_batch_flat(batch, add_special_tokens=False)
        ids, off = np.frombuffer(ids, np.uint32), np.frombuffer(off, np.uint64)
        return [ids[a:b] for a, b in zip(off[:-1], off[1:])]
else:
    import gigatoken
    t = gigatoken.Tokenizer(tok)
    def run(batch):
        return [np.asarray(x, np.uint32) for x in t.encode_batch_list(batch, parallel=False)]
r0 = resource.getrusage(resource.RUSAGE_SELF)
digest, tokens = hashlib.sha256(), 0
step = 128 if kind == "tokenizers" else 1024
for i in range(0, len(texts), step):
    for ids in run(texts[i:i + step]):
        digest.update(ids.astype(np.uint16).tobytes()); digest.update(b"\0\0"); tokens += len(ids)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tokens": tokens, "encode_cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                  "digest": digest.hexdigest()}))
'''


def raw_row(kind: str, src: Path, tok: Path) -> dict:
    """The encoder alone, one thread, the texts already in memory: CPU of the encode calls only."""
    r = measure([sys.executable, "-c", _RAW, kind, str(src), str(tok)])
    got = json.loads(r["stdout"].strip().splitlines()[-1])
    r.update(tokens=got["tokens"], cpu=got["encode_cpu"], digest=got["digest"])
    return r


def megatron_row(megatron_lm: Path, src: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    wrapper = out / "run_megatron_tool.py"
    wrapper.write_text(_MEGATRON_WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(megatron_lm), "OMP_NUM_THREADS": "1"}
    r = measure([sys.executable, str(wrapper), str(megatron_lm / "tools" / "preprocess_data.py"), "--input", str(src),
                 "--output-prefix", str(out / "mlm"), "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", str(tok_dir), "--workers", str(workers), "--append-eod"], env=env)
    r["tokens"] = int(idx_lengths(out / "mlm_text_document.idx").sum())
    r["stream"] = stream_digest([out / "mlm_text_document.bin"])
    return r


def idx_lengths(path: Path):
    """Sequence lengths from a Megatron .idx (header, version, dtype code, counts, int32 lengths)."""
    import struct

    import numpy as np

    data = path.read_bytes()
    (count,) = struct.unpack_from("<Q", data, 18)
    return np.frombuffer(data, np.int32, count, 34).astype(np.int64)


def raw_digest_of_stream(bin_paths: list[Path], lengths) -> str:
    """The raw rows' digest recomputed from shards (documents without their EOD)."""
    import numpy as np

    data = np.concatenate([np.fromfile(p, np.uint16) for p in bin_paths])
    digest, start = hashlib.sha256(), 0
    for n in lengths:
        digest.update(data[start:start + n - 1].tobytes())
        digest.update(b"\0\0")
        start += n
    return digest.hexdigest()


# --- per-stage costs --------------------------------------------------------------------------------

def components(src: Path, tok: Path, work: Path) -> list[tuple[str, float, str]]:
    """CPU seconds per GB of jsonl for each stage, in this process, one thread."""
    import json as stdjson
    import pickle

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_lm2.preprocess.encode import with_eod
    from megatron_lm2.preprocess.readers import discover_inputs, iter_tasks, task_lines
    from megatron_lm2.tokenizer import load_tokenizer
    from megatron_lm2.tokenizer.encoders import fast_encoder, reference_encoder

    f = discover_inputs([str(src)])[0]
    gb = f.size / 1e9
    rows = []

    def timed(label, fn, note=""):
        t0 = time.process_time()
        out = fn()
        rows.append((label, (time.process_time() - t0) / gb, note))
        return out

    tasks = timed("read + cut jsonl into tasks (main)", lambda: list(iter_tasks(0, f, 0, 1024)))
    tasks = [t for t in tasks if not t.end]
    timed("pickle + unpickle tasks (hand-off to a worker)", lambda: [pickle.loads(pickle.dumps(t, 5)) for t in tasks])
    lines = timed("split task bytes into lines (worker)", lambda: [task_lines(t) for t in tasks])
    timed("parse rows: json.loads", lambda: [[stdjson.loads(x)["text"] for x in ls] for ls in lines], "stdlib")
    import orjson

    texts = timed("parse rows: orjson.loads", lambda: [[orjson.loads(x)["text"] for x in ls] for ls in lines], "used")
    tokzr = load_tokenizer(tok)
    fast = fast_encoder(tokzr)
    encoded = timed("encode: fastokens encode_batch_flat", lambda: [fast.encode_flat(t) for t in texts], "used")
    timed("encode: tokenizers encode_batch_fast (reference)",
          lambda: [reference_encoder(tokzr).encode_flat(t[:len(t) // 10]) for t in texts], "on 1/10, x10")
    rows[-1] = (rows[-1][0], rows[-1][1] * 10, rows[-1][2])
    batches = timed("append EOD, cast to uint16 (numpy)", lambda: [with_eod(i, n, tokzr.eod, np.uint16) for i, n in encoded])
    timed("pickle + unpickle results (hand-off back)", lambda: [pickle.loads(pickle.dumps(b, 5)) for b in batches])

    def write(fsync: bool):
        path = work / "component.bin"
        with open(path, "wb") as out:
            for tokens, _ in batches:
                out.write(tokens.tobytes())
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        path.unlink()

    timed("write shard bytes (no fsync)", lambda: write(False))
    timed("write shard bytes + fsync", lambda: write(True), "CPU only; the wait is in wall time")
    # parquet: the same texts as one file; read the column as Python strings in one call
    table = pa.table({"text": [t for ts in texts for t in ts]})
    pq.write_table(table, work / "component.parquet", row_group_size=1000)
    pf = pq.ParquetFile(work / "component.parquet")
    timed("parquet: read row groups + to_pylist (used)",
          lambda: [pf.read_row_group(i, columns=["text"]).column(0).to_pylist() for i in range(pf.num_row_groups)])
    timed("parquet: as bytes + per-row decode (before)",
          lambda: [[b.decode() for b in pf.read_row_group(i, columns=["text"]).column(0).cast(pa.large_binary()).to_pylist()]
                   for i in range(pf.num_row_groups)])
    (work / "component.parquet").unlink()
    return rows


# --- driver ------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=40, help="corpus size in MB (default 40)")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rss", default="", help="comma-separated input sizes in GB for the peak-RSS rows, e.g. 0.1,2")
    p.add_argument("--rss-log", default="", help="append the peak-RSS rows to this jsonl as they finish and print "
                                                 "the table of every row in it (run one size per invocation)")
    p.add_argument("--components", action="store_true", help="also measure each stage's cost")
    p.add_argument("--styles", default=",".join(TOKENIZER_STYLES), help="tokenizer styles: " + ", ".join(TOKENIZER_STYLES))
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--tmp", default=tempfile.gettempdir())
    args = p.parse_args()
    megatron_lm = Path(os.environ["MEGATRON_LM"]) if os.environ.get("MEGATRON_LM") else None

    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_", dir=args.tmp))
    try:
        src = work / "corpus.jsonl"
        docs = write_corpus(src, args.mb, 0)
        styles = [x for x in args.styles.split(",") if x]
        toks = {style: train_tokenizer(work / style, src, args.vocab, style) for style in styles}
        print(header(args, src, docs))
        for style, tok in toks.items():
            if not args.skip_table:
                print(f"\n### tokenizer: {TOKENIZER_STYLES[style]}, vocab {args.vocab:,}")
                table(args, src, tok, work / f"runs_{style}", megatron_lm)
        tok = toks[styles[0]]
        if args.components:
            print(f"\nPer-stage cost, one thread, in-process (CPU s per GB of jsonl; {styles[0]} tokenizer):\n")
            rows = [("stage", "CPU s / GB", "note")]
            rows += [(label, f"{v:.2f}", note) for label, v, note in components(src, tok, work)]
            print_markdown(rows)
        if args.rss:
            rss_rows(args, tok, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def header(args, src: Path, docs: int) -> str:
    commit = _commit()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "megatron_lm2/preprocess",
                            "megatron_lm2/tokenizer", "benchmarks/bench_preprocess.py"],
                           capture_output=True, text=True).stdout.strip()
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores, load avg {os.getloadavg()[0]:.1f}; "
            f"Python {platform.python_version()}, tokenizers {v('tokenizers')}, fastokens {v('fastokens')}, "
            f"gigatoken {v('gigatoken')}, orjson {v('orjson')}, transformers {v('transformers')}, "
            f"megatron-core {v('megatron-core')}\n"
            f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}{' (+ local changes)' if dirty else ''}\n"
            f"shape: {src.stat().st_size / 1e6:.1f} MB jsonl, {docs:,} documents (synthetic long stories), "
            f"workers {args.workers}")


def table(args, src: Path, tok: Path, work: Path, megatron_lm: Path | None) -> None:
    work.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    ref = lm2_row(src, tok, work / "ref", args.workers, "--encoder", "hf")
    rows.append(("lm2-preprocess --encoder hf", ref))
    rows.append(("lm2-preprocess (default: auto)", lm2_row(src, tok, work / "auto", args.workers)))
    rows.append(("lm2-preprocess (default) --no-fsync", lm2_row(src, tok, work / "nofsync", args.workers, "--no-fsync")))
    manifest = json.loads((work / "ref" / "manifest.json").read_text())
    lengths = []
    for s in manifest["shards"]:
        lengths.extend(idx_lengths(work / "ref" / (s["prefix"] + ".idx")).tolist())
    raw_reference = raw_digest_of_stream([work / "ref" / (s["prefix"] + ".bin") for s in manifest["shards"]], lengths)
    for kind in ("tokenizers", "fastokens", "gigatoken"):
        try:
            __import__(kind)
        except ImportError:
            continue
        try:
            r = raw_row(kind, src, tok)
        except RuntimeError as e:
            notes.append(f"{kind}: cannot encode with this tokenizer.json: {str(e).strip().splitlines()[-4]}")
            continue
        r["stream"] = ref["stream"] if r["digest"] == raw_reference else "differs"
        rows.append((f"{kind} alone (encode calls only, 1 thread)", r))
    if megatron_lm is not None:
        try:
            rows.append(("Megatron-LM tools/preprocess_data.py", megatron_row(megatron_lm, src, tok.parent,
                                                                              work / "mlm", args.workers)))
        except RuntimeError as e:
            notes.append(f"Megatron-LM's tool did not run: {str(e)[-1500:]}")
    base = {label: r["tokens"] / r["cpu"] for label, r in rows}
    hf_raw = base.get("tokenizers alone (encode calls only, 1 thread)")
    mlm = base.get("Megatron-LM tools/preprocess_data.py")
    out = [("run", "tokens", "wall s", "CPU s", "tok/CPU-s", "vs tokenizers alone", "vs Megatron-LM tool",
            "peak RSS GiB", "same stream", "shards by encoder / verify s")]
    for label, r in rows:
        rate = r["tokens"] / r["cpu"]
        out.append((label, f"{r['tokens']:,}", f"{r['wall']:.1f}", f"{r['cpu']:.2f}", f"{rate:,.0f}",
                    f"{rate / hf_raw:.2f}x" if hf_raw else "-", f"{rate / mlm:.2f}x" if mlm else "-",
                    f"{r['rss']:.2f}", "yes" if r["stream"] == ref["stream"] else "NO",
                    (", ".join(f"{k} {v}" for k, v in r["encoders"].items()) + f" / {r['verify_s']:.2f}")
                    if "encoders" in r else ""))
    print()
    print_markdown(out)
    for note in notes:
        print(f"\nnote: {note}")


RSS_COLUMNS = ("input bytes", "documents", "tokens", "wall s", "CPU s", "tok/CPU-s", "peak RSS GiB (tree)",
               "parent MiB", "max worker MiB", "shards by encoder")


def rss_rows(args, tok: Path, work: Path) -> None:
    """Peak RSS against input size: one fresh run per size, rows appended to ``--rss-log`` as
    they finish (so sizes can run one per invocation, in the background); the table printed
    is every row of the log."""
    print(f"\nPeak RSS of lm2-preprocess (default encoder, tokenizer {tok.parent.name}, {args.workers} workers) "
          "vs input size; documents carry 25% fresh random words, so an encoder cache that kept them would grow:\n")
    log = Path(args.rss_log) if args.rss_log else work / "rss.jsonl"
    for gb in (float(x) for x in args.rss.split(",") if x):
        src = work / f"rss_{gb}.jsonl"
        docs = write_corpus(src, gb * 1000, 1, unique_words=0.25)
        r = lm2_row(src, tok, work / f"rss_out_{gb}", args.workers, "--shard-tokens", "100000000")
        row = {"input_bytes": src.stat().st_size, "documents": docs, "tokens": r["tokens"], "wall": r["wall"],
               "cpu": r["cpu"], "rss_tree_gib": r["rss"], "rss_parent_mib": r["rss_parent"],
               "rss_worker_mib": r["rss_worker"], "encoders": r["encoders"], "workers": args.workers,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit()}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        src.unlink()
        shutil.rmtree(work / f"rss_out_{gb}", ignore_errors=True)
    print_rss_table(log)


def print_rss_table(log: Path) -> None:
    rows = [json.loads(line) for line in open(log) if line.strip()]
    out = [RSS_COLUMNS]
    for r in sorted(rows, key=lambda r: r["input_bytes"]):
        out.append((f"{r['input_bytes']:,}", f"{r['documents']:,}", f"{r['tokens']:,}", f"{r['wall']:.0f}",
                     f"{r['cpu']:.1f}", f"{r['tokens'] / r['cpu']:,.0f}", f"{r['rss_tree_gib']:.3f}",
                     f"{r['rss_parent_mib']:.0f}", f"{r['rss_worker_mib']:.0f}",
                     ", ".join(f"{k} {v}" for k, v in r["encoders"].items())))
    print_markdown(out)
    if len(rows) > 1:
        trees = [r["rss_tree_gib"] for r in rows]
        print(f"\npeak RSS of the tree: {min(trees):.3f}-{max(trees):.3f} GiB, "
              f"max/min - 1 = {max(trees) / min(trees) - 1:+.1%} over {len(rows)} sizes")


def _commit() -> str:
    from megatron_lm2.provenance import git_commit

    return git_commit(cwd=str(REPO))


def print_markdown(table) -> None:
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
