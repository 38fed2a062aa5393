"""Small shared pieces of lm2-sweep: the data error type and an atomic text write."""

from __future__ import annotations

import os

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.fileio import write_text_atomic


class SweepDataError(UserInputError):
    """A plan.json, metrics.jsonl or results table that cannot be read; the message names the
    file, the line or row, and the key at fault."""


def atomic_write_text(path: str, text: str) -> None:
    """Write via a temporary file in the same directory and os.replace, so a reader (or a
    killed writer) never sees half a file. In the locale's encoding, with mode 0o600 (what
    tempfile.mkstemp gave this function before it used megatron_lm2.fileio)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text, encoding=None, fsync=True, unique=True, permissions=0o600)
