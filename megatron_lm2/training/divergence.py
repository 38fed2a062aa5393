"""Divergence guard: "known good" means finite AND not diverged (issue 35).

A run with a far too large learning rate or weight decay can keep every weight finite
(max |w| of 1e10 .. 1e29) while its loss is that of noise; the finiteness checks alone would
save it as known good and keep-last would prune the sane checkpoints. Two signals, each cheap:

- the loss: above `loss_factor` x the running median of the last `window` losses for
  `loss_patience` steps in a row (a spike that recovers is not divergence);
- the weights: their RMS over every parameter (one fp32 sum of squares per DDP buffer, the
  same pass as the finiteness check) above `max_weight_rms`. A healthy LM's parameter RMS is
  O(0.01 .. 1) (inits of std 0.02, norm weights 1); 100 is far past any trained model and is
  crossed in the first step by an update of --lr 1e6 or weight decay 1e30.

The trainer asks `observe` after every step; a verdict halts the run before anything is saved.
While the loss streak is running (not yet a verdict) a save is recorded as not known-good.
0 turns a signal off. The decision is a plain function of numbers, so the tests replay loss
curves through it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Optional

DEFAULT_LOSS_FACTOR = 4.0
DEFAULT_LOSS_PATIENCE = 20
DEFAULT_MAX_WEIGHT_RMS = 100.0
WINDOW = 200  # losses in the running median
MIN_HISTORY = 20  # losses before the loss signal may judge


@dataclass
class DivergenceGuard:
    loss_factor: float = DEFAULT_LOSS_FACTOR
    loss_patience: int = DEFAULT_LOSS_PATIENCE
    max_weight_rms: float = DEFAULT_MAX_WEIGHT_RMS
    window: int = WINDOW
    losses: Deque[float] = field(default_factory=deque)
    streak: int = 0  # steps in a row above loss_factor x median

    def observe(self, loss: float, weight_rms: Optional[float]) -> Optional[str]:
        """None while the run looks sane, else why it diverged (one phrase). Non-finite losses
        are the skip logic's business and are not recorded."""
        if self.max_weight_rms > 0 and weight_rms is not None and weight_rms > self.max_weight_rms:
            return (f"the weights' RMS is {weight_rms:.3g}, above --max-weight-rms {self.max_weight_rms:g} "
                    f"(a healthy model's is O(0.01 .. 1))")
        if not math.isfinite(loss):
            return None
        if self.loss_factor > 0 and self.loss_patience > 0 and len(self.losses) >= MIN_HISTORY:
            median = statistics.median(self.losses)
            if loss > self.loss_factor * median:
                self.streak += 1
                if self.streak >= self.loss_patience:
                    return (f"the loss stayed above --divergence-loss-factor {self.loss_factor:g} x its "
                            f"running median {median:.4g} for {self.streak} steps (now {loss:.4g})")
                return None  # a spike is not added to the median it is judged against
            self.streak = 0
        self.losses.append(loss)
        if len(self.losses) > self.window:
            self.losses.popleft()
        return None

    @property
    def suspicious(self) -> bool:
        """A loss streak is running: a checkpoint saved now is not known good."""
        return self.streak > 0
