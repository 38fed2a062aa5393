"""One tokenizer interface over a HF ``tokenizer.json`` and a SentencePiece ``.model``.

The whole API::

    from megatron_lm2.tokenizer import load_tokenizer, DEFAULT_TOKENIZER
    tok = load_tokenizer(spec)        # spec: None / "default" (the embedded 2k SentencePiece model),
                                      # a tokenizer.json, a .model, or a directory holding one of them
    tok.encode("text")                -> list[int]          (no BOS/EOS added)
    tok.encode_batch(["a", "b"])      -> list[list[int]]    (the library's batch fast path)
    tok.decode([ids])                 -> str
    tok.vocab_size                    -> int  (unpadded, added tokens included)
    tok.eod, tok.bos, tok.pad         -> int, int | None, int
    tok.name, tok.path, tok.kind, tok.sha256   identity: kind is "hf" or "sentencepiece",
                                      sha256 the hash of the file's bytes
    tok.identity()                    -> dict of the above (what the preprocessing manifest stores)
    tok.unique_identifiers            -> OrderedDict (Megatron-core's GPTDatasetConfig reads it)

A ``Tokenizer`` carries ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers``, so it can be
given to ``GPTDatasetConfig(tokenizer=...)`` as is.

Bulk encoding for preprocessing lives in ``megatron_lm2.tokenizer.encoders``: the reference encoder
(this module's ``encode_batch``) and optional fast ones (fastokens), each ``encode_flat(texts) ->
(ids, lengths)``; ``lm2-preprocess`` uses a fast one only where it was checked equal on the data.

End-of-document id: an explicit ``eod_token`` wins; otherwise the first of ``<|endoftext|>``
(SmolLM, GPT-2), ``<|end_of_text|>`` (Llama-3), ``</s>``, ``<eos>`` present in the vocabulary, or
the SentencePiece model's ``eos_id``.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from megatron_lm2.cli_errors import UserInputError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TOKENIZER = ASSETS / "tokenizer" / "lm2-synthetic-2k.model"

_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class TokenizerError(UserInputError):
    """A tokenizer could not be found, read, or lacks an end-of-document token."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_tokenizer_path(spec: str | os.PathLike | None) -> Path:
    """Map a user spec to the tokenizer file it names (see the module docstring)."""
    if spec is None or str(spec) == "default":
        path = DEFAULT_TOKENIZER
        if not path.is_file():
            raise TokenizerError(f"the embedded default tokenizer is missing: {path}")
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return models[0]
        raise TokenizerError(
            f"tokenizer directory {path} holds neither tokenizer.json nor a single *.model file"
        )
    if not path.exists():
        raise TokenizerError(f"tokenizer not found: {path} (--tokenizer takes a tokenizer.json, "
                             "a SentencePiece .model, a directory holding one, or 'default')")
    return path


class Tokenizer:
    """Base class: identity and the Megatron-facing attributes; subclasses do the encoding."""

    kind = ""

    def __init__(self, path: Path, vocab_size: int, eod: int, bos: int | None, pad: int | None):
        self.path = path
        self.name = path.parent.name if path.name in ("tokenizer.json", "tokenizer.model") else path.stem
        self.sha256 = file_sha256(path)
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.bos = None if bos is None else int(bos)
        # GPTDataset masks labels equal to pad: fall back to eod, whose loss is what Megatron's
        # own tokenizers mask in that case as well.
        self.pad = self.eod if pad is None else int(pad)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls=type(self).__name__, name=self.name, sha256=self.sha256,
                           vocab_size=self.vocab_size, eod=self.eod)

    def identity(self) -> dict:
        return {"name": self.name, "type": self.kind, "path": str(self.path), "sha256": self.sha256,
                "vocab_size": self.vocab_size, "eod": self.eod, "bos": self.bos, "pad": self.pad}

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod}, path={str(self.path)!r})")


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers`` tokenizer.json (SmolLM, Llama-3, ...). Never adds special tokens."""

    kind = "hf"

    def __init__(self, path: Path, eod_token: str | None = None):
        from tokenizers import Tokenizer as _RustTokenizer

        try:
            self._tok = _RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot read HF tokenizer {path}: {e}") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eod = _pick(vocab, (eod_token,) if eod_token else _EOD_CANDIDATES)
        if eod is None:
            raise TokenizerError(f"{path}: no end-of-document token among "
                                 f"{[eod_token] if eod_token else list(_EOD_CANDIDATES)}; pass --eod-token")
        super().__init__(path, self._tok.get_vocab_size(with_added_tokens=True), eod,
                         _pick(vocab, _BOS_CANDIDATES), _pick(vocab, _PAD_CANDIDATES))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the offset bookkeeping ids do not need.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; ``threads`` bounds the C++ batch encoder's threads."""

    kind = "sentencepiece"

    def __init__(self, path: Path, eod_token: str | None = None, threads: int = 1):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot read SentencePiece model {path}: {e}") from e
        self.threads = threads
        if eod_token:
            eod = self._sp.piece_to_id(eod_token)
            if eod == self._sp.unk_id() and eod_token != self._sp.id_to_piece(eod):
                raise TokenizerError(f"{path}: --eod-token {eod_token!r} is not in the vocabulary")
        else:
            eod = self._sp.eos_id()
            if eod < 0:
                raise TokenizerError(f"{path}: the model has no eos piece; pass --eod-token")
        bos, pad = self._sp.bos_id(), self._sp.pad_id()
        super().__init__(path, self._sp.get_piece_size(), eod, bos if bos >= 0 else None,
                         pad if pad >= 0 else None)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(map(int, ids)))


def load_tokenizer(spec: str | os.PathLike | None = None, eod_token: str | None = None) -> Tokenizer:
    """Load the tokenizer ``spec`` names (None or "default": the embedded one)."""
    path = resolve_tokenizer_path(spec)
    if path.suffix == ".json":
        return HFTokenizer(path, eod_token)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, eod_token)
    raise TokenizerError(f"unknown tokenizer file type: {path} (expected tokenizer.json or *.model)")


def _pick(vocab: dict, candidates) -> int | None:
    for token in candidates:
        if token in vocab:
            return vocab[token]
    return None


__all__ = ["DEFAULT_TOKENIZER", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "TokenizerError",
           "load_tokenizer", "resolve_tokenizer_path", "file_sha256"]
