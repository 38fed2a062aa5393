"""Save-and-exit on SIGTERM / SIGUSR1 (slurm preemption: `--signal=USR1@120`, or torchrun
forwarding them). The handler only sets a flag; the trainer checks it after each step on every
rank together (a signal may reach only some ranks), saves, and exits."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignal:
    def __init__(self, enabled: bool = True):
        self.received = None
        self._previous = {}
        if enabled:
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def any_rank(self) -> bool:
        """True on every rank when any rank got a signal (collective)."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if dist.is_initialized():
            if torch.cuda.is_available():
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
