"""Tokenizer files for an exported Hugging Face folder, checked against the model's vocabulary.

A HF `tokenizer.json` is copied as is (with its tokenizer_config.json / special_tokens_map.json
when they sit next to it) and loads as PreTrainedTokenizerFast. A SentencePiece `.model` is
copied as `tokenizer.model` with a LlamaTokenizer config (transformers converts it on load;
text that starts with a space may split differently from sentencepiece itself).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.tokenizer import load_tokenizer

_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


class TokenizerMismatch(UserInputError):
    """The tokenizer cannot go with this model."""


def check_tokenizer(spec, model_vocab_size: int):
    """Load the tokenizer and check it fits the model: every token id must have an embedding
    row (the model's vocabulary is padded, so it may be larger)."""
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerMismatch(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary has only {model_vocab_size} rows: this tokenizer was not the one the "
            f"model was trained with"
        )
    return tokenizer


def token_ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}


def _token_text(tokenizer, token_id):
    if token_id is None:
        return None
    if tokenizer.kind == "hf":
        return tokenizer._tok.id_to_token(token_id)
    return tokenizer._sp.id_to_piece(token_id)


def write_tokenizer_files(tokenizer, out_dir: Path) -> list[str]:
    """Copy the tokenizer into out_dir; returns the file names written."""
    special = {
        "bos_token": _token_text(tokenizer, tokenizer.bos),
        "eos_token": _token_text(tokenizer, tokenizer.eod),
        "pad_token": _token_text(tokenizer, tokenizer.pad),
    }
    written = []
    if tokenizer.kind == "hf":
        shutil.copyfile(tokenizer.path, out_dir / "tokenizer.json")
        written.append("tokenizer.json")
        for name in _HF_SIDE_FILES:
            if (tokenizer.path.parent / name).is_file():
                shutil.copyfile(tokenizer.path.parent / name, out_dir / name)
                written.append(name)
        if "tokenizer_config.json" not in written:
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **_present(special)}
            (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
            written.append("tokenizer_config.json")
    else:
        shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": False,
            **_present(special),
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        written += ["tokenizer.model", "tokenizer_config.json"]
    return written


def _present(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}
