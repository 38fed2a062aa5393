"""The LM2-vs-vanilla compute multiplier, pooled across budgets (issue 32 item 1).

Per-budget multipliers read one LM2 optimum off vanilla's frontier. The frontier is flat near the
optimum, so a 0.5 % error in one loss is ~10 % in compute: on synthetic data with a true
multiplier of 1.25 they ranged 0.89-1.86. Pooling uses every budget of both families at once:

    log L*_vanilla(C) = g(log C)            g a quadratic in log C (a line with < 3 budgets)
    log L*_lm2(C)     = g(log C + log m)    one horizontal shift, the same at every budget

fitted jointly to the interior isoFLOP vertices of both families (the curve's shape from both,
the shift from LM2's): for each log m the quadratic is a linear least-squares fit, and log m is
found by a bounded 1-D search. m > 1: LM2 reaches a loss with 1/m of vanilla's compute. The
interval resamples runs (the isoFLOP residual bootstrap's resampled vertices, fit.py) and refits
the whole thing per sample. An LM2 budget whose shifted compute C x m falls outside vanilla's
budgets is EXTRAPOLATED: the shift there rests on the curve's shape, not on vanilla runs, and is
reported as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

LOG_M_BOUND = math.log(20.0)  # the search's range: 1/20x to 20x


@dataclass
class Pooled:
    multiplier: float
    degree: int  # of g: 2 (quadratic) or 1 (line)
    extrapolated: List[float] = field(default_factory=list)  # LM2 budgets whose C x m is off vanilla's range
    residual_rms: float = 0.0  # of log L over all points


def _design(x: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([x ** k for k in range(degree + 1)], axis=-1)


def _sse(shift: float, xv, yv, xl, yl, degree: int) -> float:
    x = np.concatenate([xv, xl + shift])
    y = np.concatenate([yv, yl])
    design = _design(x, degree)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(((design @ coef - y) ** 2).sum())


def _search(xv, yv, xl, yl, degree: int) -> float:
    """The shift minimising the joint fit's squared error: a grid, then golden-section refinement
    around the best grid point (the error is smooth but need not be convex in the shift)."""
    grid = np.linspace(-LOG_M_BOUND, LOG_M_BOUND, 81)
    errors = [_sse(s, xv, yv, xl, yl, degree) for s in grid]
    k = int(np.argmin(errors))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _sse(a, xv, yv, xl, yl, degree), _sse(b, xv, yv, xl, yl, degree)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _sse(a, xv, yv, xl, yl, degree)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _sse(b, xv, yv, xl, yl, degree)
    return (lo + hi) / 2


def pooled_multiplier(lm2_budgets: Sequence[float], lm2_losses: Sequence[float],
                      vanilla_budgets: Sequence[float], vanilla_losses: Sequence[float]) -> Optional[Pooled]:
    """One multiplier from both families' optimal losses; None with fewer than 1 LM2 and 2
    vanilla points (nothing to shift along), or non-finite inputs."""
    xl, yl = np.log(np.asarray(lm2_budgets, float)), np.log(np.asarray(lm2_losses, float))
    xv, yv = np.log(np.asarray(vanilla_budgets, float)), np.log(np.asarray(vanilla_losses, float))
    if len(xl) < 1 or len(xv) < 2 or not (np.all(np.isfinite(xl)) and np.all(np.isfinite(yl))
                                          and np.all(np.isfinite(xv)) and np.all(np.isfinite(yv))):
        return None
    degree = 2 if len(xv) >= 3 else 1
    shift = _search(xv, yv, xl, yl, degree)
    tolerance = 1e-9
    extrapolated = [float(b) for b, x in zip(lm2_budgets, xl)
                    if x + shift < xv.min() - tolerance or x + shift > xv.max() + tolerance]
    rms = math.sqrt(_sse(shift, xv, yv, xl, yl, degree) / (len(xv) + len(xl)))
    return Pooled(float(math.exp(shift)), degree, extrapolated, rms)


def bootstrap_pooled(lm2_budgets: np.ndarray, lm2_vertex_losses: np.ndarray, lm2_ok: np.ndarray,
                     vanilla_budgets: np.ndarray, vanilla_vertex_losses: np.ndarray,
                     vanilla_ok: np.ndarray) -> List[float]:
    """The pooled multiplier of each bootstrap sample (rows of the [samples, budgets] arrays of
    resampled vertex losses and their interior masks)."""
    values = []
    for k in range(lm2_vertex_losses.shape[0]):
        fit = pooled_multiplier(lm2_budgets[lm2_ok[k]], lm2_vertex_losses[k, lm2_ok[k]],
                                vanilla_budgets[vanilla_ok[k]], vanilla_vertex_losses[k, vanilla_ok[k]])
        if fit is not None:
            values.append(fit.multiplier)
    return values
