"""megatron_lm2.tokenizer: one interface over HF tokenizer.json and SentencePiece, checked against
the libraries' own encoders; the embedded default regenerates byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers

from megatron_lm2.data.synthetic_corpus import CorpusConfig, iter_documents
from megatron_lm2.tokenizer import DEFAULT_TOKENIZER, TokenizerError, file_sha256, load_tokenizer
from megatron_lm2.tokenizer.train import build_embedded_default, main as train_main, train_hf_bpe

SAMPLES = ["Mary went to the kitchen.\nQuestion: Where is Mary?\nAnswer: kitchen",
           "  leading spaces,  double  spaces and trailing ", "Grüße — ünïcode ✓ 日本語 😀 \t tabs",
           "numbers 1234567 and 3.14159", "x"]


def _docs(n: int, seed: int) -> list[str]:
    return [d.text for d in iter_documents(n, seed, CorpusConfig(filler_words=200))]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json trained by our trainer (SmolLM / GPT-2 layout)."""
    d = tmp_path_factory.mktemp("hf")
    (d / "tokenizer.json").write_text(train_hf_bpe(_docs(30, 3), 600))
    return d


def test_embedded_default_identity_and_round_trip():
    tok = load_tokenizer()
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER))
    assert tok.kind == "sentencepiece" and tok.name == "lm2-synthetic-2k"
    assert tok.vocab_size == sp.get_piece_size() == 2048
    assert (tok.eod, tok.bos, tok.pad) == (sp.eos_id(), sp.bos_id(), sp.pad_id()) == (3, 2, 0)
    assert tok.sha256 == file_sha256(DEFAULT_TOKENIZER)
    assert DEFAULT_TOKENIZER.stat().st_size < 300_000
    texts = SAMPLES + _docs(5, 77)
    ids = tok.encode_batch(texts)
    assert ids == [sp.encode(t) for t in texts]
    assert [tok.decode(x) for x in ids] == texts  # identity normalization: lossless
    assert all(max(x) < 2048 for x in ids)
    # the corpus's own words are single pieces: ~1.2 tokens per word on a story
    story = _docs(1, 5)[0]
    assert len(tok.encode(story)) < 1.5 * len(story.split())


def test_embedded_default_regenerates_byte_identically():
    assert build_embedded_default() == DEFAULT_TOKENIZER.read_bytes()


def test_hf_tokenizer_json_matches_library(hf_dir):
    tok = load_tokenizer(hf_dir)  # a directory holding tokenizer.json
    ref = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.kind == "hf" and tok.name == hf_dir.name
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True) == 600
    assert tok.eod == ref.token_to_id("<|endoftext|>") == 0
    assert tok.pad == ref.token_to_id("<pad>") and tok.bos is None
    texts = SAMPLES + _docs(4, 8)
    ids = tok.encode_batch(texts)
    assert ids == [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert [tok.decode(x) for x in ids] == texts  # byte-level BPE round-trips
    assert tok.unique_identifiers["sha256"] == file_sha256(hf_dir / "tokenizer.json")


def test_llama3_style_special_tokens(tmp_path, hf_dir):
    """Llama-3's tokenizer.json names its tokens <|begin_of_text|> / <|end_of_text|>."""
    spec = (hf_dir / "tokenizer.json").read_text().replace("<|endoftext|>", "<|end_of_text|>")
    ref = tokenizers.Tokenizer.from_str(spec)
    ref.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    path = tmp_path / "llama3" / "tokenizer.json"
    path.parent.mkdir()
    ref.save(str(path))
    tok = load_tokenizer(path)
    assert tok.eod == ref.token_to_id("<|end_of_text|>") and tok.bos == ref.token_to_id("<|begin_of_text|>")
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    assert load_tokenizer(path, eod_token="<|eot_id|>").eod == ref.token_to_id("<|eot_id|>")


def test_errors_name_the_problem(tmp_path, hf_dir):
    with pytest.raises(TokenizerError, match="tokenizer not found: .*missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="holds neither tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="cannot read HF tokenizer"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(TokenizerError, match="no end-of-document token"):
        load_tokenizer(hf_dir / "tokenizer.json", eod_token="<|nope|>")
    with pytest.raises(TokenizerError, match="is not in the vocabulary"):
        load_tokenizer(None, eod_token="<|nope|>")


def test_train_cli_sentencepiece_and_hf(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in _docs(40, 4)))
    assert train_main(["--input", str(corpus), "--json-key", "body", "--output", str(tmp_path / "m.model"),
                       "--vocab-size", "500", "--model-type", "unigram"]) == 0
    tok = load_tokenizer(tmp_path / "m.model")
    assert tok.vocab_size == 500 and tok.eod == 3
    assert tok.decode(tok.encode(SAMPLES[0])) == SAMPLES[0]
    assert train_main(["--input", str(corpus), "--json-key", "body", "--kind", "hf-bpe", "--vocab-size", "700",
                       "--output", str(tmp_path / "bpe" / "tokenizer.json")]) == 0
    hf = load_tokenizer(tmp_path / "bpe")
    assert hf.vocab_size == 700 and hf.eod == 0
