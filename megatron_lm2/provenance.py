"""Where a result came from: the commit of the working tree that produced it (standard library
only)."""

from __future__ import annotations

import subprocess
from typing import Optional


def git_commit(cwd: Optional[str] = None) -> str:
    """``git rev-parse --short HEAD`` in ``cwd`` (default: the current directory), or "unknown"
    where there is no git or no repository."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=cwd).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
