"""Helper processes that must not outlive the trainer.

Only the standard library at import: the spawned Manager process unpickles `_die_with_parent`
from here, and importing megatron-core there would repeat its import-time warnings on the
trainer's stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

_WRITER_MANAGER = None


def _die_with_parent() -> None:
    """Runs in the Manager process: the kernel sends it SIGKILL when the trainer dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the trainer died before prctl took effect
        os._exit(0)


def writer_queue_dies_with_us() -> None:
    """megatron-core 0.16's FileSystemWriterAsync (the torch_dist writer) starts a spawn-context
    multiprocessing Manager on a process's first save (filesystem_async._get_write_results_queue)
    and keeps it for the life of the process. It exits with a trainer that exits or is
    SIGTERMed, but a trainer killed with SIGKILL leaves it (and the resource tracker beside it)
    orphaned. Start that Manager ourselves, with PR_SET_PDEATHSIG (Linux), so that the kernel
    ends it with the trainer."""
    global _WRITER_MANAGER
    if not sys.platform.startswith("linux"):
        return
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already made, or a megatron-core without this global: left alone
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    _WRITER_MANAGER = manager
    filesystem_async._results_queue = manager.Queue()
