"""Whether a BOS token goes in front of every prompt (`--bos auto|on|off`), and the line the
report prints about it. No heavy imports: the CLI checks the flag before loading torch."""

from __future__ import annotations

from typing import Optional

from megatron_lm2.cli_errors import UserInputError

BOS_CHOICES = ("auto", "on", "off")


def resolve_bos(choice: str, lm2: bool) -> tuple[Optional[bool], str]:
    """--bos auto|on|off -> (the generators' `bos`, the line the report prints).

    auto matches how the model was trained: an LM2 model (Megatron checkpoint or its HF export)
    saw its pretraining documents with no BOS in front (megatron_lm2.tokenizer adds none; the
    documents are only separated by eod), so off; any other HF model gets what its tokenizer adds
    by default, as in the benchmark's runner (add_special_tokens=True)."""
    if choice not in BOS_CHOICES:
        raise UserInputError(f"--bos {choice!r}: expected one of {', '.join(BOS_CHOICES)}")
    if choice == "on":
        return True, "on (the tokenizer's BOS id before every prompt)"
    if choice == "off":
        return False, "off (no BOS; the bare prompt encoding)"
    if lm2:
        return False, "off (auto: LM2 is pretrained on documents with no BOS, separated by eod)"
    return None, "tokenizer default (auto: add_special_tokens=True, as the benchmark's runner)"
