"""lm2-preprocess: shards read back with Megatron-core equal the tokenizer's own encoding;
workers / MPI ranks / resume do not change a byte; malformed rows are counted and listed; the
blend file is accepted by BlendedMegatronDatasetBuilder."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megatron_lm2.data.synthetic_corpus import CorpusConfig, iter_documents
from megatron_lm2.preprocess.blend import load_blend
from megatron_lm2.preprocess.cli import main
from megatron_lm2.preprocess.manifest import load_manifest
from megatron_lm2.tokenizer import load_tokenizer

SHORT = CorpusConfig(filler_words=60, events=4, questions=2)
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _texts(count: int, seed: int) -> list[str]:
    return [d.text for d in iter_documents(count, seed, SHORT)]


def _write_parquet(path: Path, values, row_group_size: int, kind=pa.string()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(values))), "text": pa.array(values, type=kind)}), path,
                   row_group_size=row_group_size)


def _write_jsonl(path: Path, rows: list) -> None:
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A SmolLM-like root (two parquet subsets, several files and row groups) plus jsonl files."""
    root = tmp_path_factory.mktemp("corpus")
    smol = root / "smollm"
    _write_parquet(smol / "cosmopedia-v2" / "train-00000-of-00002.parquet", _texts(23, 1), row_group_size=7)
    _write_parquet(smol / "cosmopedia-v2" / "train-00001-of-00002.parquet", _texts(11, 2), row_group_size=4)
    _write_parquet(smol / "fineweb-edu-dedup" / "train-00000-of-00001.parquet", _texts(30, 3), row_group_size=9)
    _write_parquet(smol / "python-edu" / "train-00000-of-00001.parquet", ["print(1)"] * 5, row_group_size=5)
    unicode_texts = ["Grüße aus Köln — ünïcode ✓", "日本語のテキスト", "emoji 😀 and tabs\tand\nnewlines"]
    for name in ("plain.jsonl", "packed.jsonl.gz", "packed2.jsonl.zst"):
        _write_jsonl(root / "jsonl" / name, [{"text": t, "n": i} for i, t in enumerate(_texts(9, len(name)) + unicode_texts)])
    return root


def _run(argv: list[str]) -> None:
    assert main([*argv, "--no-progress"]) == 0


def _expected(files: list[Path], tok, key: str = "text") -> list[list[int]]:
    """Every valid document, in file and row order, encoded by the tokenizer itself, plus eod."""
    docs = []
    for path in files:
        if path.suffix == ".parquet":
            texts = pq.read_table(path).column(key).to_pylist()
        else:
            data = path.read_bytes()
            data = {"gz": gzip.decompress, "zst": zstandard.decompress}.get(path.name.rsplit(".", 1)[-1],
                                                                             bytes)(data)
            texts = [json.loads(line)[key] for line in data.splitlines()]
        docs.extend(tok.encode(t) + [tok.eod] for t in texts)
    return docs


def _read_back(out: Path) -> tuple[dict, list[list[int]]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest = load_manifest(out)
    docs = []
    for shard in manifest["shards"]:
        ds = IndexedDataset(shard["path"])
        assert len(ds) == shard["documents"]
        assert int(ds.sequence_lengths.sum()) == shard["tokens"]
        docs.extend(ds[i].tolist() for i in range(len(ds)))
    return manifest, docs


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").rglob("*")) if p.is_file()}


def test_shards_equal_tokenizer_encoding(corpus, tmp_path):
    out = tmp_path / "out"
    _run(["--input", str(corpus / "smollm"), "--subsets", "cosmopedia-v2,fineweb-edu-dedup",
          "--input", str(corpus / "jsonl"), "--output", str(out), "--shard-tokens", "700",
          "--workers", "0", "--rows-per-task", "5"])
    tok = load_tokenizer()
    files = (sorted((corpus / "smollm" / "cosmopedia-v2").glob("*.parquet"))
             + sorted((corpus / "smollm" / "fineweb-edu-dedup").glob("*.parquet"))
             + sorted((corpus / "jsonl").iterdir()))
    manifest, docs = _read_back(out)
    expected = _expected(files, tok)
    assert docs == expected
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 2048
    assert manifest["tokenizer"]["eod"] == tok.eod == 3
    assert manifest["totals"]["documents"] == len(expected) == 23 + 11 + 30 + 3 * 12
    assert manifest["totals"]["tokens"] == sum(map(len, expected))
    assert set(manifest["subsets"]) == {"cosmopedia-v2", "fineweb-edu-dedup", "jsonl"}
    assert manifest["subsets"]["jsonl"]["files"] == 3
    # shards respect the budget (a shard closes on the document reaching it) and tile each file's rows
    for f in manifest["files"]:
        shards = [s for s in manifest["shards"] if s["source"] == f["path"]]
        assert [s["prefix"] for s in shards] == f["shards"]
        assert shards[0]["rows"][0] == 0 and shards[-1]["rows"][1] == f["rows"]
        for a, b in zip(shards, shards[1:]):
            assert a["rows"][1] == b["rows"][0]
            assert a["tokens"] >= 700
        for s in shards:
            assert s["documents"] == s["rows"][1] - s["rows"][0]
    assert len(manifest["shards"]) > len(manifest["files"])  # the budget did cut files
    assert manifest["command"][:3] == ["lm2-preprocess", "--input", str(corpus / "smollm")]


def test_workers_and_resume_give_identical_bytes(corpus, tmp_path):
    inputs = ["--input", str(corpus / "smollm"), "--subsets", "fineweb-edu-dedup,cosmopedia-v2",
              "--input", str(corpus / "jsonl" / "packed.jsonl.gz"), "--shard-tokens", "500", "--rows-per-task", "3"]
    _run([*inputs, "--output", str(tmp_path / "a"), "--workers", "0"])
    _run([*inputs, "--output", str(tmp_path / "b"), "--workers", "2"])
    reference = _shard_bytes(tmp_path / "a")
    assert reference == _shard_bytes(tmp_path / "b")

    # Simulate a kill after some shards: drop the later commit records (and the manifest); the
    # rerun restarts each file at the row after its last record — mid row group for parquet.
    out = tmp_path / "b"
    (out / "manifest.json").unlink()
    dropped = 0
    for record in sorted((out / ".progress").rglob("*.json")):
        if record.name.endswith(".done.json") or (record.stem[-5:].isdigit() and int(record.stem[-5:]) >= 2):
            record.unlink()
            dropped += 1
    for shard in list((out / "shards").rglob("*_0000[3-9].bin"))[:2]:
        shard.write_bytes(b"garbage from an interrupted run")
    assert dropped > 3
    _run([*inputs, "--output", str(out), "--workers", "0"])
    assert _shard_bytes(out) == reference
    assert load_manifest(out)["totals"] == load_manifest(tmp_path / "a")["totals"]


def test_malformed_rows_are_skipped_counted_and_listed(tmp_path, capsys):
    good = _texts(3, 9)
    rows = [{"text": good[0]}, b"{not json", {"other": "x"}, {"text": 42}, {"text": ""}, {"text": "  \n"},
            b'{"text": "caf\xe9"}', [1, 2], {"text": None}, {"text": good[1]}]
    _write_jsonl(tmp_path / "in" / "bad.jsonl", rows)
    _write_parquet(tmp_path / "in" / "nulls.parquet", [good[2], None, b"\xff\xfe", b"fine bytes"],
                   row_group_size=2, kind=pa.binary())
    (tmp_path / "in" / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    truncated = gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in _texts(40, 5)))
    (tmp_path / "in" / "truncated.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    out = tmp_path / "out"
    _run(["--input", str(tmp_path / "in"), "--output", str(out), "--workers", "0", "--rows-per-task", "4"])
    manifest, docs = _read_back(out)
    tok = load_tokenizer()
    bad, nulls = str(tmp_path / "in" / "bad.jsonl"), str(tmp_path / "in" / "nulls.parquet")
    corrupt, trunc = str(tmp_path / "in" / "corrupt.parquet"), str(tmp_path / "in" / "truncated.jsonl.gz")
    listed = {(e["file"], e["row"], e["reason"]) for e in manifest["skipped_rows"]}
    truncated_rows = [e["row"] for e in manifest["skipped_rows"] if e["file"] == trunc]
    assert len(truncated_rows) == 1 and 0 < truncated_rows[0] < 40
    assert listed == {
        (bad, 1, "bad_json"), (bad, 2, "missing_text"), (bad, 3, "non_string_text"), (bad, 4, "empty_text"),
        (bad, 5, "empty_text"), (bad, 6, "invalid_utf8"), (bad, 7, "bad_json"), (bad, 8, "missing_text"),
        (corrupt, 0, "corrupt_file"), (nulls, 1, "missing_text"), (nulls, 2, "invalid_utf8"),
        (trunc, truncated_rows[0], "corrupt_file")}
    assert manifest["totals"]["skipped"] == {"bad_json": 2, "corrupt_file": 2, "empty_text": 2,
                                             "invalid_utf8": 2, "missing_text": 3, "non_string_text": 1}
    # the rows before the truncation point survive, in order
    readable = _texts(40, 5)[: truncated_rows[0]]
    expected = [tok.encode(t) + [tok.eod] for t in [good[0], good[1], good[2], "fine bytes"] + readable]
    assert sorted(map(tuple, docs)) == sorted(map(tuple, expected))
    summary = capsys.readouterr().out
    assert "skipped rows: bad_json=2" in summary and f"{bad}:1  bad_json" in summary


def test_clear_errors(corpus, tmp_path, capsys):
    src = str(corpus / "jsonl" / "plain.jsonl")
    assert main(["--input", src, "--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "nope.model")]) == 2
    assert f"tokenizer not found: {tmp_path / 'nope.model'}" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    _run(["--input", src, "--output", str(tmp_path / "o"), "--workers", "0"])
    from megatron_lm2.tokenizer.train import train_sentencepiece

    other = tmp_path / "other.model"
    other.write_bytes(train_sentencepiece(_texts(40, 4), 400))
    assert main(["--input", src, "--output", str(tmp_path / "o"), "--tokenizer", str(other), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "already holds shards made with tokenizer lm2-synthetic-2k" in err and "other" in err


def _run_cli_subprocess(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_lm2.preprocess.cli", *argv, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_kill_9_then_rerun_is_byte_identical(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{"text": d.text} for d in iter_documents(300, 11, CorpusConfig(filler_words=600))])
    argv = ["--input", str(src), "--shard-tokens", "6000", "--workers", "0", "--rows-per-task", "2"]
    _run([*argv, "--output", str(tmp_path / "ref")])
    reference = _shard_bytes(tmp_path / "ref")
    assert len(reference) > 40

    out = tmp_path / "killed"
    proc = _run_cli_subprocess([*argv, "--output", str(out)], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".progress").rglob("*_*.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group we started: no worker survives
    proc.wait()
    records = list((out / ".progress").rglob("*_*.json"))
    assert 3 <= len(records) < len(reference) // 2, "the run should have been killed before it finished"
    assert not (out / "manifest.json").exists()
    for record in records:  # what was committed is already final
        prefix = json.loads(record.read_text())["prefix"]
        for ext in (".bin", ".idx"):
            assert (out / (prefix + ext)).read_bytes() == reference[prefix + ext]

    rerun = _run_cli_subprocess([*argv, "--output", str(out)])
    log = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, log
    assert _shard_bytes(out) == reference
    assert load_manifest(out)["totals"] == load_manifest(tmp_path / "ref")["totals"]


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"mpiexec not found at {MPIEXEC} (pip install mpich mpi4py)")
def test_two_mpi_ranks_match_one(corpus, tmp_path):
    argv = ["--input", str(corpus / "smollm"), "--input", str(corpus / "jsonl"), "--shard-tokens", "800",
            "--workers", "0", "--rows-per-task", "4"]
    _run([*argv, "--output", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_"))}
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "megatron_lm2.preprocess.cli", *argv,
                           "--output", str(tmp_path / "two"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert two["last_run"]["ranks"] == 2 and one["last_run"]["ranks"] == 1
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")
    assert one["totals"] == two["totals"]
    assert [s["prefix"] for s in one["shards"]] == [s["prefix"] for s in two["shards"]]
    assert _read_back(tmp_path / "one")[1] == _read_back(tmp_path / "two")[1]


def test_blend_feeds_blended_megatron_dataset_builder(corpus, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    out = tmp_path / "out"
    _run(["--input", str(corpus / "smollm"), "--subsets", "cosmopedia-v2,fineweb-edu-dedup", "--output", str(out),
          "--shard-tokens", "400", "--workers", "0", "--blend", "paper"])
    prefixes, weights = load_blend(out / "blend.json")
    manifest = load_manifest(out)
    assert prefixes == [s["path"] for s in manifest["shards"]]
    cosmo = sum(w for p, w in zip(prefixes, weights) if "/cosmopedia-v2/" in p)
    assert cosmo == pytest.approx(28 / 248) and sum(weights) == pytest.approx(1.0)

    tok = load_tokenizer(manifest["tokenizer"]["path"])
    config = GPTDatasetConfig(random_seed=1234, sequence_length=64, blend=(prefixes, weights), split="100,0,0",
                              tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=None, mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [2000, 0, 0], lambda: True, config).build()
    assert len(train) >= 2000  # the builder oversamples slightly (blend surplus)
    sample = train[0]
    assert sample["tokens"].shape == (64,) and int(sample["tokens"].max()) < tok.vocab_size
    # the blend's sampling follows the weights: Cosmopedia-v2 share of samples ~ 28/248
    from_cosmo = np.isin(train.dataset_index, [i for i, p in enumerate(prefixes) if "/cosmopedia-v2/" in p])
    assert from_cosmo.mean() == pytest.approx(28 / 248, abs=0.01)
    # and a sample is cut from its shard's documents: split at eod, the inner pieces are whole
    # documents, the outer ones a suffix and a prefix of documents (GPTDataset shuffles documents)
    dataset = int(train.dataset_index[0])
    docs = [tuple(d.tolist()) for d in _iter_docs(prefixes[dataset])]
    window = sample["tokens"].tolist()
    cuts = [i + 1 for i, t in enumerate(window) if t == tok.eod]
    pieces = [tuple(window[a:b]) for a, b in zip([0] + cuts, cuts + [len(window)]) if b > a]
    if len(pieces) == 1:  # inside one document
        text = " ".join(map(str, pieces[0]))
        assert any(f" {text} " in f" {' '.join(map(str, d))} " for d in docs)
        return
    assert any(d[len(d) - len(pieces[0]):] == pieces[0] for d in docs)
    assert all(p in docs for p in pieces[1:-1])
    assert any(d[: len(pieces[-1])] == pieces[-1] for d in docs)


def _iter_docs(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].copy() for i in range(len(ds))]  # copies: the mmap closes with ds


def test_lone_surrogate_row_is_skipped_and_the_rerun_succeeds(tmp_path, capsys):
    """Valid JSON holding "\\ud800" used to abort the run with a TypeError, and every rerun too."""
    good = _texts(3, 21)
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n"
                           for t in [good[0], "before \ud800 after", good[1], "\udfff", good[2]]))
    for _ in range(2):  # the rerun finds the finished output and succeeds as well
        _run(["--input", str(src), "--output", str(tmp_path / "o"), "--workers", "0"])
    manifest, docs = _read_back(tmp_path / "o")
    tok = load_tokenizer()
    assert docs == [tok.encode(t) + [tok.eod] for t in good]
    assert [(e["row"], e["reason"]) for e in manifest["skipped_rows"]] == [(1, "lone_surrogate"), (3, "lone_surrogate")]
    assert "skipped rows: lone_surrogate=2" in capsys.readouterr().out


def test_jsonl_tasks_tile_the_rows_for_any_cut(tmp_path):
    from megatron_lm2.preprocess.readers import discover_inputs, iter_tasks, task_lines

    lines = [json.dumps({"text": t}).encode() for t in _texts(40, 4)] + [b"", b"{bad", b'{"text": "crlf"}\r']
    src = tmp_path / "t.jsonl"
    src.write_bytes(b"\n".join(lines))  # no newline after the last row: still a row
    f = discover_inputs([str(src)])[0]
    for rows_per_task, max_bytes, start in [(1, 1 << 20, 0), (7, 1 << 20, 0), (1000, 1500, 0), (3, 900, 11),
                                            (5, 1 << 20, 43), (5, 1 << 20, 50)]:
        tasks = list(iter_tasks(0, f, start, rows_per_task, max_task_bytes=max_bytes))
        body, end = tasks[:-1], tasks[-1]
        assert end.end and end.first_row == max(len(lines), start)
        got = [line for t in body for line in task_lines(t)]
        assert got == lines[start:]
        assert [t.first_row for t in body] == list(np.cumsum([start] + [t.num_rows for t in body])[:len(body)])
        assert all(0 < t.num_rows <= rows_per_task and len(task_lines(t)) == t.num_rows for t in body)
        assert all(len(t.data) < max_bytes + 2000 for t in body)  # a task closes on the line reaching the cap


def test_fsync_makes_each_shard_and_record_durable(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(12, 3)))
    _run(["--input", str(src), "--output", str(tmp_path / "o"), "--workers", "0", "--shard-tokens", "400"])
    shards = load_manifest(tmp_path / "o")["shards"]
    assert len(shards) >= 3
    names = [Path(c).name for c in calls]
    for s in shards:  # data before the rename, the record after it
        stem = Path(s["prefix"]).name
        assert names.index(f"{stem}.bin.tmp") < names.index(f"{stem}.json.tmp")
        assert f"{stem}.idx.tmp" in names
    assert "manifest.json.tmp" in names
    calls.clear()
    _run(["--input", str(src), "--output", str(tmp_path / "p"), "--workers", "0", "--no-fsync"])
    assert calls == []


def test_bad_inputs_name_the_file_and_the_reason(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    rng = np.random.default_rng(0)
    (bad / "x.jsonl").write_bytes(bytes(rng.integers(0, 256, 20_000, dtype=np.uint8)))
    good = tmp_path / "good.parquet"
    _write_parquet(good, _texts(30, 2), row_group_size=10)
    (bad / "t.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), bad / "n.parquet")
    assert main(["--input", str(bad), "--output", str(tmp_path / "o"), "--no-progress", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "blend" not in err
    assert err.startswith("lm2-preprocess: error: no documents written: ")
    manifest = load_manifest(tmp_path / "o")
    skipped = manifest["files"][2]["skipped"]
    assert set(skipped) <= {"bad_json", "invalid_utf8"} and sum(skipped.values()) == manifest["files"][2]["rows"] > 0
    detail = ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
    assert (f"{bad / 'x.jsonl'}: 0 documents written — {sum(skipped.values()):,} rows skipped ({detail})") in err
    assert f"{bad / 't.parquet'}: cannot read (truncated or not a parquet file): " in err
    assert f"{bad / 'n.parquet'}: no column 'text' (columns: id, content; use --json-key)" in err

    # with one good file the run succeeds and warns about the others
    (bad / "good.parquet").write_bytes(good.read_bytes())
    assert main(["--input", str(bad), "--output", str(tmp_path / "o2"), "--no-progress", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"lm2-preprocess: warning: {bad / 'n.parquet'}: no column 'text'" in err
    assert load_manifest(tmp_path / "o2")["totals"]["documents"] == 30


def test_cli_errors_are_one_line_and_output_is_quiet(tmp_path):
    """As a user sees it: exit 2, one line, no traceback; and a normal run does not repeat
    megatron-core's Transformer Engine / Apex warnings."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(3, 1)))
    for argv, expected in [(["--input", str(tmp_path / "nope.jsonl")], "no such file or directory"),
                           (["--input", str(src), "--shard-tokens", "0"], "--shard-tokens 0: must be >= 1"),
                           (["--input", str(src), "--tokenizer", str(tmp_path / "t.model")], "tokenizer not found")]:
        proc = subprocess.run([sys.executable, "-m", "megatron_lm2.preprocess.cli", *argv, "--output",
                               str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and expected in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "megatron_lm2.preprocess.cli", "--input", str(src), "--output",
                           str(tmp_path / "ok"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Transformer Engine" not in proc.stderr and "Apex" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_shard_writer_matches_megatron_core_builder(tmp_path, dtype):
    """Our numpy .bin/.idx writer against megatron-core's IndexedDatasetBuilder, byte for byte."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_lm2.preprocess.shards import ShardWriter

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n) for n in [1, 5, 300, 2, 4000, 1]]
    ours = ShardWriter(str(tmp_path / "a.bin"), dtype)
    ours.add(np.concatenate(docs[:3]), np.array([len(d) for d in docs[:3]]))
    ours.add(np.concatenate(docs[3:]), np.array([len(d) for d in docs[3:]]))
    ours.finalize(str(tmp_path / "a.idx"), fsync=True)
    theirs = IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype=dtype)
    for d in docs:
        theirs.add_document(d, [len(d)])
    theirs.finalize(str(tmp_path / "b.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()


def test_preprocessing_does_not_import_torch(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(3, 1)))
    code = ("import sys; from megatron_lm2.preprocess.cli import main; "
            f"main(['--input', {str(src)!r}, '--output', {str(tmp_path / 'o')!r}, '--no-progress', '--workers', '0']); "
            "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
