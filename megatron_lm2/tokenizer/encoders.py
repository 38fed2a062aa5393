"""Batch encoders behind one call, ``encode_flat(texts) -> (ids, lengths)``: the reference (the
tokenizer's own library: HF ``tokenizers`` or ``sentencepiece``) and optional fast ones.

A fast encoder is only ever used after it has been checked against the reference on the data
at hand (``megatron_lm2.preprocess.verify``); this module only builds them and says why one
cannot be built. ``ids`` is one flat integer array of every text's tokens, ``lengths`` the
int64 token count of each text (no special tokens are added, none is appended).

    enc = reference_encoder(tok)                 # always works
    enc = fast_encoder(tok, "fastokens")         # raises EncoderUnavailable with the reason
    ids, lengths = enc.encode_flat(["a", "b"])
    enc.name                                     # "fastokens 0.3.5", "tokenizers 0.23.3", ...

Fast encoders known here: ``fastokens`` (``pip install -e .[fast]``). Its optional segment cache
(meant for chat traffic) is switched off: on a corpus every segment is new, so a cache could only
grow.

fastokens also keeps a pretoken -> ids cache per *thread* (thread-local, no API to size or clear
it): a table that doubles up to 2^21 entries (64 MiB) plus an id spill pool and a long-pretoken
cache, ~125 MiB per thread once full, reached after ~1.5M distinct pretokens (~50-100 MB of
text with many rare words). A new ``fastokens.Tokenizer`` does not free it: the thread parks the
old model's cache (up to 3) and starts another. Ending the thread does. So ``FastokensEncoder``
encodes on a private thread that it replaces after ``recycle_chars`` characters (default 8M):
the cache never holds more than what 8M characters put in it (a preprocessing worker peaks at
~120 MiB instead of ~190-350 MiB on the benchmark's rare-word corpus), so memory no longer
depends on how far into a stream a worker is. A fresh thread starts from the model's seeded
cache; no CPU cost was measurable (``benchmarks/preprocess.md``). ``recycle_chars=0`` encodes on
the calling thread.

fastokens is ~50x ``tokenizers`` on a single byte-level pre-tokenizer but ~5x on SmolLM's
``Sequence[Digits(individual_digits), ByteLevel]``; for exactly that pre-tokenizer it is given an
equivalent one, a single Split regex (GPT-2's, with digits single and a whitespace run that ends
before a digit kept whole, which is where Digits cut first) then ByteLevel without its regex: ~4x
faster again. The rewrite only ever feeds the fast encoder, and the fast encoder is only used
where it was checked equal to the reference reading the user's file as is.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from itertools import chain
from typing import Sequence

import copy
import json
import os
import threading

import numpy as np

from megatron_lm2.tokenizer import TokenizerError

FAST_ENCODERS = ("fastokens",)


class EncoderUnavailable(TokenizerError):
    """A fast encoder that is not installed or does not cover this tokenizer."""


def library_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def flatten(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


class ReferenceEncoder:
    """The tokenizer's own library (what every shard must equal)."""

    fast = False

    def __init__(self, tok):
        self.tok = tok
        self.library = "tokenizers" if tok.kind == "hf" else "sentencepiece"
        self.name = f"{self.library} {library_version(self.library)}"

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return flatten(self.tok.encode_batch(texts))


# Characters a FastokensEncoder's private thread encodes before it is replaced (module docstring).
RECYCLE_CHARS = 8 << 20


class FastokensEncoder:
    """``fastokens.Tokenizer`` over the same tokenizer.json: one flat uint32 buffer per batch,
    no per-token Python objects. Encodes on a private thread replaced every ``recycle_chars``
    characters, which frees fastokens' thread-local cache (module docstring)."""

    fast = True
    library = "fastokens"

    def __init__(self, tok, recycle_chars: int = RECYCLE_CHARS):
        if tok.kind != "hf":
            raise EncoderUnavailable(f"fastokens reads tokenizer.json files only, not the {tok.kind} model {tok.path}")
        try:
            import fastokens
        except ImportError as e:
            raise EncoderUnavailable("fastokens is not installed (pip install -e .[fast])") from e
        try:
            spec = json.loads(tok.path.read_text(encoding="utf-8"))
            equivalent = single_regex_pre_tokenizer(spec)
            self.rewritten = equivalent is not None
            self._tok = fastokens.Tokenizer.from_json_str(json.dumps(equivalent or spec))
        except Exception as e:  # the Rust side raises ValueError / RuntimeError on what it does not cover
            raise EncoderUnavailable(f"fastokens cannot load {tok.path}: {' '.join(str(e).split())[:300]}") from e
        self._tok.enable_segment_cache(0)  # bounded memory: see the module docstring
        self.name = f"fastokens {library_version('fastokens')}"
        self.recycle_chars = recycle_chars
        self.threads_started = 0          # private encode threads started so far
        self._thread: ThreadPoolExecutor | None = None
        self._thread_pid = 0              # a forked child gets no thread: it starts its own
        self._thread_chars = 0
        self._lock = threading.Lock()

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.empty(0, np.uint32), np.empty(0, np.int64)
        texts = list(texts)
        if self.recycle_chars <= 0:
            ids, offsets = self._encode(texts)
        else:
            with self._lock:
                if (self._thread is None or self._thread_pid != os.getpid()
                        or self._thread_chars >= self.recycle_chars):
                    self.close()
                    self._thread = ThreadPoolExecutor(1, thread_name_prefix="lm2-fastokens")
                    self._thread_pid = os.getpid()
                    self._thread_chars = 0
                    self.threads_started += 1
                self._thread_chars += sum(map(len, texts))
                ids, offsets = self._thread.submit(self._encode, texts).result()
        offsets = np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)
        return np.frombuffer(ids, dtype=np.uint32), np.diff(offsets)

    def _encode(self, texts: list[str]):
        return self._tok.encode_batch_flat(texts, add_special_tokens=False)

    def close(self) -> None:
        """End the private thread (its fastokens cache is freed as the thread exits)."""
        thread, self._thread = self._thread, None
        if thread is not None and self._thread_pid == os.getpid():
            thread.shutdown(wait=True)


# GPT-2's ByteLevel split with ` ?\p{N}+` made `\p{N}` (Digits(individual_digits) isolates each
# digit, and no space joins it) and `\s+(?=\p{N})` before `\s+(?!\S)` (a whitespace run ending
# at a digit ended a Digits piece, where `(?!\S)` held). Checked equal on 20k random strings of
# digits (ASCII, Arabic-Indic, ½, Ⅻ, ²), whitespace runs, contractions, CJK and emoji, and by
# tests/test_encoders.py; and the preprocessing verification checks every file regardless.
_DIGITS_THEN_BYTE_LEVEL = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+")


def single_regex_pre_tokenizer(spec: dict) -> dict | None:
    """An equivalent tokenizer.json whose pre-tokenizer fastokens runs on its fast path, for
    SmolLM's Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]; None
    for any other pre-tokenizer (used as is)."""
    pt = spec.get("pre_tokenizer") or {}
    if pt.get("type") != "Sequence" or len(pt.get("pretokenizers") or []) != 2:
        return None
    digits, byte_level = pt["pretokenizers"]
    if digits != {"type": "Digits", "individual_digits": True}:
        return None
    if (byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space")
            or not byte_level.get("use_regex", True)):
        return None
    out = copy.deepcopy(spec)
    out["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _DIGITS_THEN_BYTE_LEVEL}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}
    return out


def reference_encoder(tok) -> ReferenceEncoder:
    return ReferenceEncoder(tok)


def fast_encoder(tok, name: str = "fastokens"):
    if name == "fastokens":
        return FastokensEncoder(tok)
    raise EncoderUnavailable(f"unknown encoder {name!r} (known: {', '.join(FAST_ENCODERS)})")


__all__ = ["EncoderUnavailable", "FAST_ENCODERS", "FastokensEncoder", "ReferenceEncoder", "fast_encoder",
           "RECYCLE_CHARS", "flatten", "library_version", "reference_encoder", "single_regex_pre_tokenizer"]
