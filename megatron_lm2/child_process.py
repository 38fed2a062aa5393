"""What runs inside helper processes that must not outlive the trainer (compat.
checkpoint_writer_dies_with_us starts the one megatron-core's checkpoint writer needs).

Only the standard library at import: the spawned Manager process unpickles `die_with_parent`
from here, and importing megatron-core there would repeat its import-time warnings on the
trainer's stderr. It sits at the package's top level, below compat.py and training/, so that
neither has to import upwards.
"""

from __future__ import annotations

import os
import signal


def die_with_parent() -> None:
    """Runs in the Manager process: the kernel sends it SIGKILL when the trainer dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the trainer died before prctl took effect
        os._exit(0)
