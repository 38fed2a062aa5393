"""--profile-steps A:B: torch.profiler over training steps A .. B-1 (the log's step numbers,
from 1) on the ranks in --profile-ranks (default rank 0), CPU activities plus CUDA where a GPU
is present, written as one Chrome trace JSON per rank into --profile-dir (default
<save>/profile, or runs/profile without --save). Open it in chrome://tracing or Perfetto.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from megatron_lm2.config import ConfigError
from megatron_lm2.logs import get_logger

log = get_logger(__name__)


def parse_steps(text: str) -> Tuple[int, int]:
    """'A:B' -> (A, B), 1 <= A < B; anything else is a ConfigError naming --profile-steps."""
    try:
        first, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--profile-steps {text!r}: expected A:B, the steps A .. B-1 "
                          f"(e.g. 10:12)") from None
    if first < 1 or stop <= first:
        raise ConfigError(f"--profile-steps {text!r}: needs 1 <= A < B (profiles steps A .. B-1)")
    return first, stop


def parse_ranks(text: str) -> List[int]:
    """'0,1' -> [0, 1]; a ConfigError naming --profile-ranks otherwise."""
    try:
        ranks = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise ConfigError(f"--profile-ranks {text!r}: expected comma-separated ranks like 0,1") from None
    if ranks[0] < 0:
        raise ConfigError(f"--profile-ranks {text!r}: ranks are >= 0")
    return ranks


def profile_dir(train) -> str:
    if train.profile_dir:
        return train.profile_dir
    return os.path.join(train.save, "profile") if train.save else os.path.join("runs", "profile")


class StepProfiler:
    """Starts the profiler before step A and writes the trace after step B-1 (or when the run
    stops earlier: close()). Inactive (every call a no-op) without --profile-steps or on a
    rank not asked for."""

    def __init__(self, train, rank: int):
        self.rank = rank
        self.steps: Optional[Tuple[int, int]] = None
        self.path: Optional[str] = None
        self._profiler = None
        if train.profile_steps and rank in parse_ranks(train.profile_ranks or "0"):
            self.steps = parse_steps(train.profile_steps)
            first, stop = self.steps
            self.path = os.path.join(profile_dir(train), f"trace_rank{rank}_steps{first}-{stop - 1}.json")

    def before_step(self, step: int) -> None:
        """`step`: the number of the step about to run (from 1)."""
        if self.steps is not None and step == self.steps[0] and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=False)
            self._profiler.start()

    def after_step(self, step: int) -> None:
        if self._profiler is not None and step >= self.steps[1] - 1:
            self.close()

    def close(self) -> Optional[str]:
        """Stop and write the trace if profiling; returns its path (None when nothing was written)."""
        if self._profiler is None:
            return None
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        profiler.export_chrome_trace(self.path)
        first, stop = self.steps
        log.info(f"profile of steps {first}..{stop - 1} (rank {self.rank}) written to {self.path}")
        return self.path
