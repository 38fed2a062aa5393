"""The fast encoder (fastokens) against the reference (HF tokenizers), on byte-level BPE
tokenizer.json files trained here: equal ids on the hard cases, shards byte-identical to the
reference encoder's, and a fast encoder that differs on a file's sample is never used for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from megatron_lm2.data.synthetic_corpus import CorpusConfig, iter_documents
from megatron_lm2.preprocess.cli import main
from megatron_lm2.preprocess.manifest import load_manifest
from megatron_lm2.tokenizer import load_tokenizer
from megatron_lm2.tokenizer.encoders import EncoderUnavailable, FastokensEncoder, fast_encoder, reference_encoder
from megatron_lm2.tokenizer.train import train_hf_bpe

fastokens = pytest.importorskip("fastokens", reason="the fast extra is not installed (pip install -e .[fast])")

HARD = [
    "hello <|endoftext|> world", "<|endoftext|>", "<pad><|endoftext|>x<|endoftext|>",  # special tokens in text
    "   ", "\n\n\t ", " ", "\u3000\u00a0 ",                                            # whitespace only
    "日本語のテキスト、中文文本와 한국어", "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷", "zero\u200bwidth\ufeff bom",
    "cafe\u0301 café Å Å", "\r\n\r\nCRLF\r\n", "nul\x00byte and \x1c\x1f controls", "12345678901234567890 3.14",
    "'s 'll 're 'VE I'M don't", "tabs\t\tand    spaces   ", "x" * 20_000,
    " ".join(f"w{i}x{i * 7919 % 10007}" for i in range(6_000)),        # ~70 kB of distinct words
    "ab" * 10_000 + " " + "\U0001f600" * 2_000,
    "a  1", "  12 34", "x 1", "1's", "!!1!!", "a\n\n 1\t2", "٣٤ ½ Ⅻ ²", "1  ", "foo  \n1", "$1,000.00 x1y22z333",
]


def _hostile(n: int, seed: int) -> list[str]:
    """Short random strings of what pre-tokenizers split on: digits of several scripts, whitespace
    runs, contractions, punctuation, CJK, emoji."""
    import random

    rng = random.Random(seed)
    pieces = list(" \t\n\r\u3000 0123456789abcXYZ'!?.,-_$٣٤½Ⅻ²日本😀") + ["'s", "'ll", "  ", "\n\n", "<|endoftext|>"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 50))) for _ in range(n)]


def _docs(n: int, seed: int) -> list[str]:
    return [d.text for d in iter_documents(n, seed, CorpusConfig(filler_words=150, events=4))]


def _smollm_like(texts) -> str:
    """SmolLM / Llama-style pre-tokenization: single digits, then byte-level."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def _train(d: Path, style: str) -> Path:
    texts = _docs(40, 3) + HARD[7:12] + HARD[-10:] * 3 + _hostile(500, 1)
    spec = train_hf_bpe(texts, 1200) if style == "gpt2-style" else _smollm_like(texts)
    (d / "tokenizer.json").write_text(spec)
    return d / "tokenizer.json"


@pytest.fixture(scope="module", params=["gpt2-style", "smollm-style"])
def bpe(request, tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def gpt2_bpe(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("gpt2"), "gpt2-style")


def test_fast_equals_reference_on_hard_cases(bpe):
    tok = load_tokenizer(bpe)
    fast, ref = fast_encoder(tok), reference_encoder(tok)
    library = tokenizers.Tokenizer.from_file(str(bpe))
    texts = HARD + _docs(20, 8) + _hostile(3000, 2)
    expected = [e.ids for e in library.encode_batch(texts, add_special_tokens=False)]
    ids, lengths = fast.encode_flat(texts)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    assert [ids[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == expected
    ref_ids, ref_lengths = ref.encode_flat(texts)
    assert np.array_equal(ref_ids, ids) and np.array_equal(ref_lengths, lengths)
    # special tokens in text are matched as the special token, as the reference does
    assert expected[1] == [tok.eod]
    assert fast._tok.segment_cache_stats() is None  # no growing cache
    # the SmolLM pre-tokenizer is handed to fastokens as one regex; the reference reads the file as is
    assert fast.rewritten == ("smollm" in bpe.parent.name)
    assert fast.encode_flat([])[1].size == 0


def test_fast_encoder_refuses_what_it_cannot_cover(tmp_path):
    with pytest.raises(EncoderUnavailable, match="tokenizer.json files only"):
        FastokensEncoder(load_tokenizer())  # the embedded SentencePiece model
    assert "unknown encoder" in str(pytest.raises(EncoderUnavailable, fast_encoder, load_tokenizer(), "nope").value)


def _corpus(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"text": t} for t in _docs(30, 5) + HARD]
    rows.insert(3, {"text": "\ud800 lone surrogate"})          # valid JSON, not text
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # json escapes non-ASCII
    (root / "b.jsonl").write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in rows if "\ud800" not in r["text"]).encode())
    pq.write_table(pa.table({"text": _docs(25, 6) + HARD[7:12]}), root / "c.parquet", row_group_size=7)
    return [root / "a.jsonl", root / "b.jsonl", root / "c.parquet"]


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").rglob("*")) if p.is_file()}


def test_shards_byte_identical_to_reference(bpe, tmp_path, capsys):
    files = _corpus(tmp_path / "in")
    base = ["--input", str(tmp_path / "in"), "--tokenizer", str(bpe), "--shard-tokens", "3000",
            "--rows-per-task", "8", "--no-progress", "--workers", "0"]
    assert main([*base, "--output", str(tmp_path / "ref"), "--encoder", "hf"]) == 0
    assert main([*base, "--output", str(tmp_path / "fast"), "--encoder", "fastokens"]) == 0
    assert main([*base, "--output", str(tmp_path / "auto2"), "--encoder", "auto", "--workers", "2"]) == 0
    reference = _shards(tmp_path / "ref")
    assert len(reference) > 6
    assert _shards(tmp_path / "fast") == reference == _shards(tmp_path / "auto2")
    ref, fast = load_manifest(tmp_path / "ref"), load_manifest(tmp_path / "fast")
    assert {s["encoder"] for s in ref["shards"]} == {reference_encoder(load_tokenizer(bpe)).name}
    assert {s["encoder"] for s in fast["shards"]} == {f"fastokens {fastokens_version()}"}
    assert all(f["verification"]["result"] == "equal" for f in fast["files"])
    # the lone surrogate row is skipped with its reason, the run goes on
    assert {(e["file"], e["row"], e["reason"]) for e in fast["skipped_rows"]} >= {(str(files[0]), 3, "lone_surrogate")}
    assert fast["totals"] == ref["totals"]
    # a rerun of the finished output is a no-op that succeeds
    assert main([*base, "--output", str(tmp_path / "fast"), "--encoder", "fastokens"]) == 0


def fastokens_version() -> str:
    from importlib.metadata import version

    return version("fastokens")


def test_a_differing_fast_encoder_is_not_used(gpt2_bpe, tmp_path, monkeypatch, capsys):
    """Make the fast encoder wrong on one document of one file: auto writes that file with the
    reference (and the others fast), a forced fast encoder stops naming the file."""
    _corpus(tmp_path / "in")
    marker = HARD[12]  # in a.jsonl and b.jsonl, not in c.parquet (HARD[7:12])
    original = FastokensEncoder.encode_flat

    def wrong_on_marker(self, texts):
        ids, lengths = original(self, texts)
        if marker in texts:
            ids = ids.copy()
            ids[int(lengths[: texts.index(marker)].sum())] ^= 1
        return ids, lengths

    monkeypatch.setattr(FastokensEncoder, "encode_flat", wrong_on_marker)
    base = ["--input", str(tmp_path / "in"), "--tokenizer", str(gpt2_bpe), "--shard-tokens", "3000",
            "--no-progress", "--workers", "0"]
    assert main([*base, "--output", str(tmp_path / "auto")]) == 0
    assert main([*base, "--output", str(tmp_path / "ref"), "--encoder", "hf"]) == 0
    assert _shards(tmp_path / "auto") == _shards(tmp_path / "ref")
    manifest = load_manifest(tmp_path / "auto")
    by_file = {Path(f["path"]).name: f for f in manifest["files"]}
    assert by_file["a.jsonl"]["verification"]["result"] == "differs"
    assert by_file["a.jsonl"]["verification"]["first_difference"] == "row 43"  # 30 stories, the surrogate row, HARD[12]
    assert by_file["c.parquet"]["verification"]["result"] == "equal"
    encoders = {s["source"]: s["encoder"] for s in manifest["shards"]}
    assert encoders[by_file["a.jsonl"]["path"]].startswith("tokenizers ")
    assert encoders[by_file["b.jsonl"]["path"]].startswith("tokenizers ")
    assert encoders[by_file["c.parquet"]["path"]].startswith("fastokens ")
    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "forced"), "--encoder", "fastokens"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.jsonl: fastokens" in err and "row 43 differently" in err


def test_sentencepiece_auto_uses_reference_and_forced_fast_is_refused(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(5, 2)))
    assert main(["--input", str(src), "--output", str(tmp_path / "o"), "--no-progress", "--workers", "0"]) == 0
    manifest = load_manifest(tmp_path / "o")
    assert {s["encoder"].split()[0] for s in manifest["shards"]} == {"sentencepiece"}
    assert "tokenizer.json files only" in manifest["last_run"]["fast_encoder_note"]
    capsys.readouterr()
    assert main(["--input", str(src), "--output", str(tmp_path / "o2"), "--encoder", "fastokens"]) == 2
    assert "--encoder fastokens: fastokens reads tokenizer.json files only" in capsys.readouterr().err


def test_sample_reaches_past_the_first_documents(tmp_path):
    from megatron_lm2.preprocess.readers import discover_inputs
    from megatron_lm2.preprocess.verify import sample_texts

    src = tmp_path / "big.jsonl"
    docs = _docs(400, 9)
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    f = discover_inputs([str(src)])[0]
    first = sample_texts(f, "text", 0, 20_000, 0)
    sample = sample_texts(f, "text", 0, 20_000, 40_000)
    assert [t for _, t in first] == docs[: len(first)] and sum(map(len, (t for _, t in first))) >= 20_000
    rest = sample[len(first):]
    assert rest and all(t in docs for _, t in rest)
    assert sum(t not in docs[: len(first)] for _, t in rest) >= len(rest) // 2   # beyond the head
    assert sample == sample_texts(f, "text", 0, 20_000, 40_000)                  # seeded: a rerun checks the same


def test_recycled_encode_thread_gives_identical_ids(gpt2_bpe):
    """The fast encoder runs on a private thread replaced every ``recycle_chars`` characters
    (which frees fastokens' thread-local cache): same ids as one thread and as the reference,
    a new thread exactly when the budget is spent, and a forked child starts its own."""
    import os

    tok = load_tokenizer(gpt2_bpe)
    texts = _docs(12, 4) + HARD
    expected = reference_encoder(tok).encode_flat(texts)
    one_thread = FastokensEncoder(tok, recycle_chars=0)
    recycled = FastokensEncoder(tok, recycle_chars=10_000)
    for enc in (one_thread, recycled):
        for start in range(0, len(texts), 4):
            ids, lengths = enc.encode_flat(texts[start:start + 4])
            offset = int(expected[1][:start].sum())
            assert np.array_equal(lengths, expected[1][start:start + 4])
            assert np.array_equal(ids, expected[0][offset:offset + int(lengths.sum())])
    assert one_thread.threads_started == 0
    calls, spent, threads = [texts[i:i + 4] for i in range(0, len(texts), 4)], None, 0
    for call in calls:  # a new thread before a call once the current one has encoded >= 10,000 chars
        if spent is None or spent >= 10_000:
            threads, spent = threads + 1, 0
        spent += sum(map(len, call))
    assert recycled.threads_started == threads == 3   # calls of 5.8k 5.7k | 6.0k .. 106k | the rest
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child inherits the encoder but not its thread
        try:
            ok = np.array_equal(recycled.encode_flat(texts)[0], expected[0]) and recycled.threads_started == threads + 1
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    recycled.close()


_CACHE_GROWTH = r'''
import json, os, sys
os.environ["FASTOKENS_BPE_THREADS"] = "1"   # as in a preprocessing worker: no fastokens pool threads
import numpy as np
from megatron_lm2.preprocess.pipeline import _fixed_mmap_threshold
from megatron_lm2.tokenizer import load_tokenizer
from megatron_lm2.tokenizer.encoders import FastokensEncoder
_fixed_mmap_threshold()
def anon():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) >> 10
enc = FastokensEncoder(load_tokenizer(sys.argv[1]), recycle_chars=int(sys.argv[2]))
rng = np.random.default_rng(0)
letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
texts = [np.concatenate([np.full((50_000, 1), 32, np.uint8), letters[rng.integers(0, 26, size=(50_000, 7))]],
                        axis=1).tobytes().decode() for _ in range(40)]   # 2M fresh 7-letter words, 16 MB
enc.encode_flat(["warm up"])
base, peak = anon(), 0
for text in texts:
    enc.encode_flat([text])
    peak = max(peak, anon())
print(json.dumps({"growth_mib": peak - base, "threads": enc.threads_started}))
'''


def test_recycling_bounds_the_fast_encoders_cache(gpt2_bpe):
    """16 MB of never-seen words: fastokens' thread-local cache grows by ~100 MiB when one thread
    encodes them all; replaced every 2M characters, the encoder's memory grows by a fraction."""
    import os
    import subprocess
    import sys

    def growth(recycle_chars: int) -> dict:
        out = subprocess.run([sys.executable, "-c", _CACHE_GROWTH, str(gpt2_bpe), str(recycle_chars)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    unbounded, bounded = growth(0), growth(2_000_000)
    assert unbounded["threads"] == 0 and bounded["threads"] == 8   # 5 texts of 400,000 chars per thread
    assert unbounded["growth_mib"] > 60, unbounded
    assert bounded["growth_mib"] < unbounded["growth_mib"] / 2, (bounded, unbounded)


def test_compare_in_chunks_finds_the_first_difference(gpt2_bpe):
    """verify.compare encodes the sample a chunk at a time (bounded memory); whatever the chunk
    size, it names the same first differing text, and None when the encoders agree."""
    from megatron_lm2.preprocess.verify import compare

    tok = load_tokenizer(gpt2_bpe)
    ref, fast = reference_encoder(tok), fast_encoder(tok)
    texts = _docs(20, 6) + HARD
    marker = texts.index(HARD[12])

    class WrongOnMarker:
        def encode_flat(self, batch):
            ids, lengths = fast.encode_flat(batch)
            if HARD[12] in batch:
                ids = ids.copy()
                ids[int(lengths[: batch.index(HARD[12])].sum())] ^= 1
            return ids, lengths

    calls = []

    class Counting:
        def encode_flat(self, batch):
            calls.append(sum(map(len, batch)))
            return fast.encode_flat(batch)

    for chunk in (1, 3_000, 50_000, 1 << 30):
        assert compare(ref, WrongOnMarker(), texts, chunk_chars=chunk) == marker
    assert compare(ref, Counting(), texts, chunk_chars=3_000) is None
    assert len(calls) > 10 and all(c <= 3_000 or n == 1 for c, n in zip(calls, _chunk_sizes(texts, 3_000)))
    assert sum(calls) == sum(map(len, texts))


def _chunk_sizes(texts, chunk_chars):
    """Texts per chunk as compare cuts them (a text longer than the chunk is a chunk alone)."""
    sizes, n, size = [], 0, 0
    for t in texts:
        if n and size + len(t) > chunk_chars:
            sizes.append(n)
            n, size = 0, 0
        n, size = n + 1, size + len(t)
    return sizes + [n]
