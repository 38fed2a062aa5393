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
"""

from __future__ import annotations

from importlib import metadata
from itertools import chain
from typing import Sequence

import numpy as np

from megatron_lm2.tokenizer import TokenizerError

FAST_ENCODERS = ("fastokens",)


class EncoderUnavailable(TokenizerError):
    """A fast encoder that is not installed or does not cover this tokenizer."""


def _version(dist: str) -> str:
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
        self.name = f"{self.library} {_version(self.library)}"

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return flatten(self.tok.encode_batch(texts))


class FastokensEncoder:
    """``fastokens.Tokenizer`` over the same tokenizer.json: one flat uint32 buffer per batch,
    no per-token Python objects."""

    fast = True
    library = "fastokens"

    def __init__(self, tok):
        if tok.kind != "hf":
            raise EncoderUnavailable(f"fastokens reads tokenizer.json files only, not the {tok.kind} model {tok.path}")
        try:
            import fastokens
        except ImportError as e:
            raise EncoderUnavailable("fastokens is not installed (pip install -e .[fast])") from e
        try:
            self._tok = fastokens.Tokenizer.from_file(str(tok.path))
        except Exception as e:  # the Rust side raises ValueError / RuntimeError on what it does not cover
            raise EncoderUnavailable(f"fastokens cannot load {tok.path}: {' '.join(str(e).split())[:300]}") from e
        self._tok.enable_segment_cache(0)  # bounded memory: see the module docstring
        self.name = f"fastokens {_version('fastokens')}"

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.empty(0, np.uint32), np.empty(0, np.int64)
        ids, offsets = self._tok.encode_batch_flat(list(texts), add_special_tokens=False)
        offsets = np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)
        return np.frombuffer(ids, dtype=np.uint32), np.diff(offsets)


def reference_encoder(tok) -> ReferenceEncoder:
    return ReferenceEncoder(tok)


def fast_encoder(tok, name: str = "fastokens"):
    if name == "fastokens":
        return FastokensEncoder(tok)
    raise EncoderUnavailable(f"unknown encoder {name!r} (known: {', '.join(FAST_ENCODERS)})")


__all__ = ["EncoderUnavailable", "FAST_ENCODERS", "FastokensEncoder", "ReferenceEncoder", "fast_encoder",
           "flatten", "reference_encoder"]
