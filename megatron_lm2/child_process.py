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
import threading


def _kill_me_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent() -> None:
    """Runs in the Manager process: the kernel sends it SIGKILL when the trainer dies."""
    _kill_me_with_parent()
    if os.getppid() == 1:  # the trainer died before prctl took effect
        os._exit(0)


# What the parent knew at fork time, read by the child (fork copies it).
_fork_parent = 0
_forked_from_main_thread = False
_hooks_registered = False


def _before_fork() -> None:
    global _fork_parent, _forked_from_main_thread
    _fork_parent = os.getpid()
    _forked_from_main_thread = threading.get_ident() == threading.main_thread().ident


def _after_fork_in_child() -> None:
    # PDEATHSIG fires when the forking *thread* ends: only a fork from the main thread is tied to
    # the parent's life, a fork from a short-lived thread would die with that thread.
    if _forked_from_main_thread:
        _kill_me_with_parent()
        if os.getppid() != _fork_parent:  # the parent died between fork and prctl
            os._exit(0)


def forks_die_with_us() -> None:
    """Every process this one forks from its main thread from now on (and every process those
    fork) gets SIGKILL from the kernel when its parent dies. megatron-core's checkpoint writer
    forks one writer per bucket; killed with the trainer mid-save, they waited forever on queues
    whose reader was gone and kept the resource tracker's pipe open, so it lived on too. With the
    writers gone, the tracker sees its pipe close and exits after its own clean-up. Linux only;
    idempotent."""
    global _hooks_registered
    if _hooks_registered or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _hooks_registered = True
