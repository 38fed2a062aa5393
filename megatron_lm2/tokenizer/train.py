"""``lm2-train-tokenizer``: train a SentencePiece (BPE / unigram) or HF byte-level BPE tokenizer.

Inputs are read like ``lm2-preprocess`` reads them (parquet, jsonl, jsonl.gz, jsonl.zst; field
``--json-key``) plus plain ``.txt`` files (one document per file). Examples::

    lm2-train-tokenizer --input corpus.jsonl --output my.model --vocab-size 8192
    lm2-train-tokenizer --input /data/smollm-corpus/cosmopedia-v2 --kind hf-bpe \\
        --output my-bpe/tokenizer.json --vocab-size 49152 --max-documents 200000
    lm2-train-tokenizer --embedded-default      # rebuild megatron_lm2/assets/tokenizer/lm2-synthetic-2k.model

SentencePiece models are trained from an in-memory iterator with one thread, so the same input
gives byte-identical models (the embedded default is regenerated and compared by a test). Every
model reserves pad=0, unk=1, bos=2, eos=3 (eos is the end-of-document token) and falls back to
bytes for unseen characters; newlines are kept as a piece of their own.

Bad input (a missing file, a vocabulary the corpus cannot fill) ends with one line and exit code
2 (megatron_lm2.cli_errors); --debug or LM2_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path
from typing import Iterable, Iterator

from megatron_lm2.cli_args import ArgumentParser
from megatron_lm2.cli_errors import UserInputError, cli_entry
from megatron_lm2.fileio import write_bytes_atomic

# The embedded default: vocab 2048 (the debug flavor's), trained on 400 documents of the
# synthetic corpus, seed 20250207 (not a training seed, so it does not favour one split).
DEFAULT_DOCUMENTS = 400
DEFAULT_SEED = 20250207
DEFAULT_VOCAB = 2048


def iter_input_texts(inputs: list[str], json_key: str) -> Iterator[str]:
    from megatron_lm2.data.readers import discover_inputs, iter_texts

    txt = [p for p in inputs if p.endswith(".txt")]
    for path in txt:
        yield Path(path).read_text(encoding="utf-8")
    rest = [p for p in inputs if not p.endswith(".txt")]
    if rest:
        for f in discover_inputs(rest):
            yield from iter_texts(f, json_key)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> bytes:
    """Serialized SentencePiece model trained on ``texts`` (deterministic: one thread)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["\n"],
        # identity normalization keeps text exactly (newlines, runs of spaces) so decode(encode(x)) == x
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        max_sentence_length=1 << 22, num_threads=1, minloglevel=2)
    return model.getvalue()


def train_hf_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """tokenizer.json (byte-level BPE, GPT-2/SmolLM style, ``<|endoftext|>`` = id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str(pretty=True)


def build_embedded_default() -> bytes:
    from megatron_lm2.data.synthetic_corpus import iter_documents

    texts = (d.text for d in iter_documents(DEFAULT_DOCUMENTS, DEFAULT_SEED))
    return train_sentencepiece(texts, DEFAULT_VOCAB, "bpe")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, fsync=False)


class TokenizerTrainingError(UserInputError):
    """The trainer refused the input or the options (e.g. a vocabulary larger than the corpus
    supports); the message names the flag."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _trained(train, *args, vocab_size: int):
    """Run a trainer; its own refusals (SentencePiece raises RuntimeError with the reason,
    tokenizers a generic Exception) become one line naming --vocab-size / --input."""
    try:
        return train(*args)
    except UserInputError:
        raise
    except Exception as error:  # noqa: BLE001 - the libraries raise RuntimeError or bare Exception
        reason = " ".join(str(error).split())
        raise TokenizerTrainingError(
            f"training failed for --vocab-size {vocab_size} on the given --input ({reason[-300:]})") from error


@cli_entry("lm2-train-tokenizer")
def main(argv: list[str] | None = None) -> int:
    from megatron_lm2.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    p = ArgumentParser(prog="lm2-train-tokenizer", description="Train a SentencePiece (BPE / unigram) or HF byte-level BPE tokenizer on local text.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="parquet / jsonl(.gz/.zst) file or directory, or a .txt file; repeatable")
    p.add_argument("--json-key", default="text", help="text field (default text)")
    p.add_argument("--output", help="output .model (SentencePiece) or tokenizer.json (hf-bpe)")
    p.add_argument("--kind", choices=("sentencepiece", "hf-bpe"), default="sentencepiece",
                   help="SentencePiece .model (default) or HF byte-level BPE tokenizer.json")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece model type")
    p.add_argument("--vocab-size", type=_positive, default=DEFAULT_VOCAB, help=f"vocabulary size (default {DEFAULT_VOCAB})")
    p.add_argument("--max-documents", type=_positive, default=None, help="train on at most this many documents")
    p.add_argument("--embedded-default", action="store_true",
                   help=f"rebuild the embedded default tokenizer ({DEFAULT_VOCAB} pieces, synthetic corpus "
                        f"seed {DEFAULT_SEED}, {DEFAULT_DOCUMENTS} documents); --output defaults to the asset")
    args = p.parse_args(argv)

    if args.embedded_default:
        out = Path(args.output) if args.output else DEFAULT_TOKENIZER
        _write_atomic(out, build_embedded_default())
    else:
        if not args.input or not args.output:
            p.error("--input and --output are required (or --embedded-default)")
        texts = iter_input_texts(args.input, args.json_key)
        if args.max_documents:
            texts = itertools.islice(texts, args.max_documents)
        out = Path(args.output)
        if args.kind == "sentencepiece":
            if out.suffix != ".model":
                p.error(f"--output {out}: a SentencePiece model must end in .model")
            _write_atomic(out, _trained(train_sentencepiece, texts, args.vocab_size, args.model_type,
                                        vocab_size=args.vocab_size))
        else:
            if out.suffix != ".json":
                p.error(f"--output {out}: a HF tokenizer must end in .json (e.g. DIR/tokenizer.json)")
            _write_atomic(out, _trained(train_hf_bpe, texts, args.vocab_size,
                                        vocab_size=args.vocab_size).encode("utf-8"))
    tok = load_tokenizer(out)
    print(f"wrote {out}: {tok.kind}, vocab {tok.vocab_size}, eod {tok.eod}, sha256 {tok.sha256[:16]}…")
    return 0


if __name__ == "__main__":
    sys.exit(main())
