"""Is a folder small enough to carry to the device machine with the working tree?

    python tools/carry_size.py wheels/          # exit 0 and the size if under 64 MiB, else 1

tools/fetch_device_wheels.sh runs it on the wheels it downloads.
"""

from __future__ import annotations

import os
import sys

LIMIT_BYTES = 64 * 2**20  # what the device call carries with the working tree, in all


def folder_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def check(path, limit_bytes: int = LIMIT_BYTES) -> int:
    size = folder_bytes(path)
    verdict = "fits" if size <= limit_bytes else "TOO LARGE"
    print(f"{path}: {size / 2**20:.1f} MiB of {limit_bytes / 2**20:.0f} MiB: {verdict}")
    return 0 if size <= limit_bytes else 1


if __name__ == "__main__":
    sys.exit(check(sys.argv[1] if len(sys.argv) > 1 else "wheels"))
