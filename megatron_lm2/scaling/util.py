"""Small shared pieces of lm2-sweep: the data error type and an atomic text write."""

from __future__ import annotations

import os
import tempfile

from megatron_lm2.cli_errors import UserInputError


class SweepDataError(UserInputError):
    """A plan.json, metrics.jsonl or results table that cannot be read; the message names the
    file, the line or row, and the key at fault."""


def atomic_write_text(path: str, text: str) -> None:
    """Write via a temporary file in the same directory and os.replace, so a reader (or a
    killed writer) never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
