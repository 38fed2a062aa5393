"""Save-and-exit on SIGTERM / SIGUSR1 (slurm preemption: `--signal=USR1@120`, or torchrun
forwarding them) and SIGINT (Ctrl-C). The handler only sets a flag; the trainer checks it after
each step on every rank together (a signal may reach only some ranks), saves, and exits. A
second Ctrl-C while that runs exits at once, with one line and no traceback (exit 130).

`all_ranks(ok)` is the one "do all ranks agree" reduction: the trainer's finite-loss and
finite-weights checks and the signal check use it."""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from megatron_lm2.compat import device

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def all_ranks(ok) -> bool:
    """True when `ok` (a bool or a 0-d bool tensor) holds on every rank: one all-reduce of one
    int, one host sync. Without torch.distributed, `ok` itself."""
    if isinstance(ok, torch.Tensor):
        flag = (~ok.to(device(), torch.bool)).to(torch.int32).reshape(1)
    else:
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` holds on at least one (collective)."""
    return not all_ranks(not flag)


class ExitSignal:
    def __init__(self, enabled: bool = True):
        self.received = None
        self._previous = {}
        if enabled:
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            sys.stderr.write("lm2-train: interrupted again: exiting now, without the save; the newest "
                             "complete checkpoint is the one `latest` names\n")
            sys.stderr.flush()
            os._exit(130)
        if signum == signal.SIGINT and self.received is None:
            sys.stderr.write("lm2-train: interrupted: saving after this step, then exiting "
                             "(Ctrl-C again to exit at once, without saving)\n")
            sys.stderr.flush()
        self.received = signal.Signals(signum).name

    def any_rank(self) -> bool:
        """True on every rank when any rank got a signal (collective)."""
        return any_rank(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
