"""`lm2-sweep fit`: isoFLOP parabolas, compute-optimal N*(C) and D*(C) per family, the
parametric L(N, D) fit, bootstrap intervals, a held-out rung, and the LM2-vs-vanilla compute
multiplier.

* isoFLOP (Chinchilla approach 2, Hoffmann et al. 2022): per family and budget, a parabola in
  log N through the runs' losses; its vertex is N*(C) (and, with a parabola in log D, D*(C)).
  A budget whose lowest loss sits at the smallest or largest N of its grid, or whose vertex falls
  outside the grid, or whose parabola opens downwards, is FLAGGED and left out of the
  power-law fits N* = k C^a, D* = k C^b (a minimum at an edge is a bound, not an optimum).
* parametric (approach 3): L(N, D) = E + A / N^alpha + B / D^beta, fitted per family by
  minimising the Huber loss (delta 1e-3) of log L against
  logsumexp(a - alpha log N, b - beta log D, e), L-BFGS-B from the best starts of a grid
  (Epoch AI's replication, Besiroglu et al. 2024, found the fit's intervals fragile: report them).
* bootstrap: B resamples of the runs, everything refitted; 5-95 % percentile intervals.
  isoFLOP: residual resampling within each budget (a case resample of 5 grid points often has
  fewer than 3 distinct sizes); parametric: case resampling of all runs.
* held out: the largest rung of each family is left out of a second parametric fit, whose
  predictions for it are compared with its measured losses.
* multiplier: at each LM2 budget with an interior minimum, the vanilla compute that reaches
  LM2's optimal loss on vanilla's frontier of optimal losses (piecewise linear in log L vs
  log C through vanilla's interior vertices, extrapolated along its end segments), divided by
  LM2's compute (> 1: LM2 needs less compute for the same loss). With fewer than two interior
  vanilla minima the frontier goes through the lowest loss per budget instead, and says so.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_lm2.scaling.multiplier import Pooled, bootstrap_pooled, pooled_multiplier
from megatron_lm2.scaling.util import SweepDataError

HUBER_DELTA = 1e-3
REQUIRED = ("run_id", "family", "group", "budget", "rung", "status", "compute_done", "tokens_done")


@dataclass
class Point:
    run_id: str
    family: str
    group: str
    budget: Optional[float]
    rung: int
    n: float  # parameters (the column chosen by --parameters)
    d: float  # tokens trained
    c: float  # executed compute
    loss: float


# ------------------------------------------------------------------------------ reading
def read_table(path: str) -> List[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pylist()
        return [{k: ("" if v is None else v) for k, v in row.items()} for row in table]
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_points(path: str, parameters: str = "params_total", loss: str = "final_val_loss",
                finished_only: bool = True) -> List[Point]:
    """Runs with a loss, as Points; SweepDataError names the column (and row) at fault."""
    rows = read_table(path)
    if not rows:
        raise SweepDataError(f"{path}: no rows")
    for name in REQUIRED + (parameters, loss):
        if name not in rows[0]:
            raise SweepDataError(f"{path}: column {name!r} is missing (a table from lm2-sweep collect?)")
    points = []
    for i, row in enumerate(rows, 2):  # line 1 is the header
        if finished_only and row["status"] != "finished":
            continue
        if row[loss] in ("", None):
            continue
        values = {}
        for name, column in (("n", parameters), ("d", "tokens_done"), ("c", "compute_done"), ("loss", loss)):
            try:
                values[name] = float(row[column])
            except (TypeError, ValueError):
                raise SweepDataError(f"{path}: row {i} ({row['run_id']}): {column}={row[column]!r} is not a number") from None
            if not values[name] > 0 or not math.isfinite(values[name]):
                raise SweepDataError(f"{path}: row {i} ({row['run_id']}): {column}={row[column]!r} must be positive")
        budget = float(row["budget"]) if row["budget"] not in ("", None) else None
        points.append(Point(run_id=row["run_id"], family=row["family"], group=row["group"], budget=budget,
                            rung=int(float(row["rung"])), **values))
    return points


# ------------------------------------------------------------------------------ isoFLOP
@dataclass
class Parabola:
    budget: float
    coefficients: Tuple[float, float, float]  # loss = c0 x^2 + c1 x + c2, x = log N (or log D)
    vertex: Optional[float]  # exp(x*) (None if no minimum)
    loss_at_vertex: Optional[float]
    flag: str  # "" when the minimum is interior


def parabola(budget: float, x: np.ndarray, y: np.ndarray) -> Parabola:
    """Quadratic in x = log(size) through (x, y); flags an edge or missing minimum."""
    if len(np.unique(x)) < 3:
        return Parabola(budget, (math.nan,) * 3, None, None, f"{len(np.unique(x))} sizes (< 3)")
    c0, c1, c2 = np.polyfit(x, y, 2)
    lowest = int(np.argmin(y))
    flag = ""
    if x[lowest] in (x.min(), x.max()):
        flag = "lowest loss at the grid's " + ("smallest" if x[lowest] == x.min() else "largest") + " size"
    if c0 <= 0:
        return Parabola(budget, (c0, c1, c2), None, None, flag or "no minimum (parabola opens downwards)")
    xv = -c1 / (2 * c0)
    if not flag and not x.min() <= xv <= x.max():
        flag = "vertex outside the grid"
    return Parabola(budget, (c0, c1, c2), float(np.exp(xv)), float(c2 - c1 ** 2 / (4 * c0)), flag)


def power_law(c: Sequence[float], v: Sequence[float]) -> Tuple[float, float]:
    """(k, a) of v = k c^a by least squares in log-log."""
    slope, intercept = np.polyfit(np.log(c), np.log(v), 1)
    return float(np.exp(intercept)), float(slope)


@dataclass
class IsoflopFit:
    family: str
    n_parabolas: List[Parabola]
    d_parabolas: List[Parabola]
    n_law: Optional[Tuple[float, float]]  # (k, a): N* = k C^a
    d_law: Optional[Tuple[float, float]]
    frontier: Optional[Tuple[float, float]]  # (p, q): log L* = p + q log C
    frontier_kind: str  # "vertices" | "lowest loss per budget"
    lowest_losses: Dict[float, float] = field(default_factory=dict)


def isoflop_groups(points: List[Point], family: str) -> Dict[float, List[Point]]:
    groups: Dict[float, List[Point]] = {}
    for p in points:
        if p.family == family and p.group == "isoflop" and p.budget is not None:
            groups.setdefault(p.budget, []).append(p)
    return dict(sorted(groups.items()))


def fit_isoflop(groups: Dict[float, List[Point]], family: str,
                losses: Optional[Dict[float, np.ndarray]] = None) -> IsoflopFit:
    """`losses` replaces the measured losses per budget (the bootstrap's resampled ones)."""
    n_par, d_par, lows = [], [], []
    for budget, pts in groups.items():
        y = losses[budget] if losses is not None else np.array([p.loss for p in pts])
        n_par.append(parabola(budget, np.log([p.n for p in pts]), y))
        d_par.append(parabola(budget, np.log([p.d for p in pts]), y))
        lows.append((budget, float(np.min(y))))
    good = [p for p in n_par if not p.flag]
    good_d = [p for p in d_par if not p.flag]
    n_law = power_law([p.budget for p in good], [p.vertex for p in good]) if len(good) >= 2 else None
    d_law = power_law([p.budget for p in good_d], [p.vertex for p in good_d]) if len(good_d) >= 2 else None
    if len(good) >= 2:
        q, p = np.polyfit(np.log([g.budget for g in good]), np.log([g.loss_at_vertex for g in good]), 1)
        frontier, kind = (float(p), float(q)), "vertices"
    elif len(lows) >= 2:
        q, p = np.polyfit(np.log([b for b, _ in lows]), np.log([l for _, l in lows]), 1)
        frontier, kind = (float(p), float(q)), "lowest loss per budget"
    else:
        frontier, kind = None, "none"
    return IsoflopFit(family, n_par, d_par, n_law, d_law, frontier, kind, dict(lows))


def compute_for_loss(loss: float, budgets: Sequence[float], losses: Sequence[float]) -> Optional[float]:
    """The compute at which a frontier through (budget, optimal loss) points reaches `loss`:
    piecewise linear in (log L, log C), extrapolated along the end segments; None with fewer
    than two points or a frontier that does not fall."""
    order = np.argsort(losses)[::-1]  # loss decreasing = compute increasing
    x = np.log(np.asarray(losses, float)[order])[::-1]  # increasing log L
    y = np.log(np.asarray(budgets, float)[order])[::-1]
    if len(x) < 2 or np.any(np.diff(x) <= 0) or np.any(np.diff(y) >= 0):
        return None
    t = math.log(loss)
    if t < x[0]:
        slope = (y[1] - y[0]) / (x[1] - x[0])
        return float(math.exp(y[0] + slope * (t - x[0])))
    if t > x[-1]:
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return float(math.exp(y[-1] + slope * (t - x[-1])))
    return float(math.exp(np.interp(t, x, y)))


def frontier_points(fit: IsoflopFit) -> Tuple[List[float], List[float]]:
    """(budgets, optimal losses): the interior vertices, or (fewer than two) the lowest losses."""
    good = [p for p in fit.n_parabolas if not p.flag]
    if len(good) >= 2:
        return [p.budget for p in good], [p.loss_at_vertex for p in good]
    return list(fit.lowest_losses), [fit.lowest_losses[b] for b in fit.lowest_losses]


def best_run_multipliers(lm2: IsoflopFit, vanilla: IsoflopFit) -> Dict[float, float]:
    """The fallback when no LM2 budget has an interior minimum: LM2's lowest loss per budget on
    vanilla's frontier of lowest losses. It compares the best runs of two grids, not
    compute-optimal models, and is reported under that name."""
    budgets, losses = list(vanilla.lowest_losses), list(vanilla.lowest_losses.values())
    out = {}
    for budget, loss in lm2.lowest_losses.items():
        compute = compute_for_loss(loss, budgets, losses)
        if compute is not None:
            out[budget] = compute / budget
    return out


def multipliers(lm2: IsoflopFit, vanilla: IsoflopFit) -> Dict[float, float]:
    """{LM2 budget: vanilla compute for LM2's optimal loss / LM2 compute}, the vanilla compute
    read off vanilla's frontier of optimal losses (piecewise linear in log-log)."""
    budgets, losses = frontier_points(vanilla)
    out = {}
    for par in lm2.n_parabolas:
        if par.flag:
            continue
        compute = compute_for_loss(par.loss_at_vertex, budgets, losses)
        if compute is not None:
            out[par.budget] = compute / par.budget
    return out


# ---------------------------------------------------------------------------- parametric
@dataclass
class Parametric:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float

    def predict(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def n_exponent(self) -> float:
        """N* ∝ C^(beta / (alpha + beta)) when C ∝ N D."""
        return self.beta / (self.alpha + self.beta)

    def as_dict(self) -> dict:
        return dict(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta, a=self.n_exponent)


def _objective(theta, x, y, target):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    pred = top + np.log(total)
    weights /= total
    r = pred - target
    absr = np.abs(r)
    huber = np.where(absr <= HUBER_DELTA, 0.5 * r ** 2, HUBER_DELTA * (absr - 0.5 * HUBER_DELTA))
    dh = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    grad = np.array([np.sum(dh * weights[0]), np.sum(dh * weights[1]), np.sum(dh * weights[2]),
                     -np.sum(dh * weights[0] * x), -np.sum(dh * weights[1] * y)])
    scale = 1.0 / (HUBER_DELTA * len(x))
    return huber.sum() * scale, grad * scale


def _grid_starts(x, y, target, keep: int):
    grid = np.array(np.meshgrid([0.0, 5.0, 10.0, 15.0, 20.0], [0.0, 5.0, 10.0, 15.0, 20.0],
                                [-1.0, -0.5, 0.0, 0.5, 1.0], [0.1, 0.3, 0.6, 1.0], [0.1, 0.3, 0.6, 1.0]))
    starts = grid.reshape(5, -1).T
    a, b, e, al, be = (starts[:, i:i + 1] for i in range(5))
    terms = np.stack([a - al * x, b - be * y, np.broadcast_to(e, (len(starts), len(x)))])
    pred = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2])
    r = np.abs(pred - target)
    huber = np.where(r <= HUBER_DELTA, 0.5 * r ** 2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)
    return starts[np.argsort(huber)[:keep]]


def fit_parametric(n, d, loss, starts: Optional[np.ndarray] = None, keep: int = 8) -> Parametric:
    """Chinchilla approach 3 (Huber on log loss, several L-BFGS-B starts)."""
    from scipy.optimize import minimize

    x, y, target = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float))
    if starts is None:
        starts = _grid_starts(x, y, target, keep)
    best = None
    bounds = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
    for start in starts:
        result = minimize(_objective, start, args=(x, y, target), jac=True, method="L-BFGS-B", bounds=bounds,
                          options=dict(maxiter=2000, ftol=1e-14, gtol=1e-12))
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return Parametric(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=float(best.fun))


def _theta(fit: Parametric) -> np.ndarray:
    return np.array([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta])


# ----------------------------------------------------------------------------- bootstrap
def interval(samples: Sequence[float], level: float = 0.90) -> Optional[Tuple[float, float]]:
    values = np.asarray([s for s in samples if s is not None and math.isfinite(s)])
    if len(values) < 2:
        return None
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_parametric(points: List[Point], fit: Parametric, samples: int, rng: np.random.Generator,
                         level: float = 0.90) -> Dict[str, Optional[Tuple[float, float]]]:
    n = np.array([p.n for p in points])
    d = np.array([p.d for p in points])
    loss = np.array([p.loss for p in points])
    draws: Dict[str, List[float]] = {k: [] for k in ("E", "A", "B", "alpha", "beta", "a")}
    for _ in range(samples):
        idx = rng.integers(0, len(points), len(points))
        # From the full fit's optimum: a resample's optimum is near it (and one start keeps B refits fast).
        refit = fit_parametric(n[idx], d[idx], loss[idx], starts=_theta(fit)[None, :])
        for key, value in refit.as_dict().items():
            draws[key].append(value)
    return {k: interval(v, level) for k, v in draws.items()}


def _batch_parabolas(x: np.ndarray, ys: np.ndarray):
    """Vertices of S parabolas through (x, ys[s]) at once: (vertex x, loss at vertex, ok mask);
    ok is False where `parabola` would flag the fit (edge, outside, no minimum)."""
    design = np.stack([x ** 2, x, np.ones_like(x)], axis=1)
    coef = ys @ np.linalg.pinv(design).T  # S x 3
    c0, c1, c2 = coef[:, 0], coef[:, 1], coef[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xv = -c1 / (2 * c0)
        lv = c2 - c1 ** 2 / (4 * c0)
    lowest = x[np.argmin(ys, axis=1)]
    ok = (c0 > 0) & (lowest != x.min()) & (lowest != x.max()) & (xv >= x.min()) & (xv <= x.max())
    return xv, lv, ok


def _masked_slope(x: np.ndarray, y: np.ndarray, ok: np.ndarray):
    """Per row: (intercept, slope) of y on x over the ok columns; NaN with fewer than 2."""
    m = ok.astype(float)
    count = m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = (m * x).sum(axis=1) / count
        my = (m * np.where(ok, y, 0.0)).sum(axis=1) / count
        dx = np.where(ok, x - mx[:, None], 0.0)
        dy = np.where(ok, y - my[:, None], 0.0)
        slope = (dx * dy).sum(axis=1) / (dx ** 2).sum(axis=1)
    slope = np.where(count >= 2, slope, np.nan)
    return my - slope * mx, slope


def bootstrap_isoflop(groups_by_family: Dict[str, Dict[float, List[Point]]], fits: Dict[str, IsoflopFit],
                      samples: int, rng: np.random.Generator, level: float = 0.90) -> dict:
    """Residual bootstrap of the parabolas: each budget's residuals (inflated by n/(n-3) for the
    three fitted coefficients) resampled onto its fitted curve; all samples at once."""
    per_family = {}
    for family, groups in groups_by_family.items():
        budgets = np.array(list(groups))
        log_c = np.log(budgets)[None, :].repeat(samples, axis=0)
        n_star, d_star, l_star, n_ok, d_ok, lowest = (np.full((samples, len(budgets)), np.nan) for _ in range(6))
        n_ok, d_ok = n_ok.astype(bool), d_ok.astype(bool)
        for j, pts in enumerate(groups.values()):
            xn, xd = np.log([p.n for p in pts]), np.log([p.d for p in pts])
            y = np.array([p.loss for p in pts])
            if len(np.unique(xn)) < 3:
                n_ok[:, j] = d_ok[:, j] = False
                lowest[:, j] = y.min()
                continue
            fitted = np.polyval(np.polyfit(xn, y, 2), xn)
            resid = (y - fitted) * math.sqrt(len(y) / max(len(y) - 3, 1))
            ys = fitted[None, :] + resid[rng.integers(0, len(y), (samples, len(y)))]
            n_star[:, j], l_star[:, j], n_ok[:, j] = _batch_parabolas(xn, ys)
            d_star[:, j], _, d_ok[:, j] = _batch_parabolas(xd, ys)
            lowest[:, j] = ys.min(axis=1)
        _, n_exp = _masked_slope(log_c, n_star, n_ok)
        _, d_exp = _masked_slope(log_c, d_star, d_ok)
        # The loss frontier log L* = p + q log C, as fit_isoflop: vertices, else lowest losses.
        with np.errstate(invalid="ignore", divide="ignore"):
            p_v, q_v = _masked_slope(log_c, np.log(l_star), n_ok)
            p_l, q_l = _masked_slope(log_c, np.log(lowest), np.isfinite(lowest))
        use_v = n_ok.sum(axis=1) >= 2
        per_family[family] = dict(budgets=budgets, n_star=np.exp(n_star), n_ok=n_ok, l_star=l_star, lowest=lowest,
                                  n_exp=n_exp, d_exp=d_exp, p=np.where(use_v, p_v, p_l), q=np.where(use_v, q_v, q_l))
    out = {}
    for family, f in per_family.items():
        out[family] = dict(n_exponent=interval(f["n_exp"], level), d_exponent=interval(f["d_exp"], level),
                           n_star={float(b): interval(f["n_star"][f["n_ok"][:, j], j], level)
                                   for j, b in enumerate(f["budgets"])},
                           multiplier={})
    if "lm2" in per_family and "vanilla" in per_family:
        lm2, van = per_family["lm2"], per_family["vanilla"]
        out["lm2"]["pooled_multiplier"] = interval(bootstrap_pooled(
            lm2["budgets"], lm2["l_star"], lm2["n_ok"], van["budgets"], van["l_star"], van["n_ok"]), level)
        for j, budget in enumerate(lm2["budgets"]):
            values = []
            for k in range(samples):
                if not lm2["n_ok"][k, j]:
                    continue
                ok = van["n_ok"][k]
                if ok.sum() >= 2:
                    front_c, front_l = van["budgets"][ok], van["l_star"][k, ok]
                else:
                    front_c, front_l = van["budgets"], van["lowest"][k]
                compute = compute_for_loss(lm2["l_star"][k, j], front_c, front_l)
                if compute is not None:
                    values.append(compute / budget)
            out["lm2"]["multiplier"][float(budget)] = interval(values, level)
        out["lm2"]["best_run_multiplier"] = {}
        for j, budget in enumerate(lm2["budgets"]):
            values = [c / budget for k in range(samples)
                      if (c := compute_for_loss(lm2["lowest"][k, j], van["budgets"], van["lowest"][k])) is not None]
            out["lm2"]["best_run_multiplier"][float(budget)] = interval(values, level)
    return out


# ----------------------------------------------------------------------------- the study
@dataclass
class Study:
    isoflop: Dict[str, IsoflopFit]
    parametric: Dict[str, Parametric]
    parametric_intervals: Dict[str, dict]
    isoflop_intervals: dict
    holdout: Dict[str, dict]
    multiplier: Dict[float, float]
    notes: List[str] = field(default_factory=list)
    best_run_multiplier: Dict[float, float] = field(default_factory=dict)
    pooled: Optional[Pooled] = None  # the multiplier pooled across budgets (multiplier.py)
    extrapolated: List[float] = field(default_factory=list)  # per-budget multipliers read off vanilla's range


def pooled_from_fits(lm2: IsoflopFit, vanilla: IsoflopFit) -> Optional[Pooled]:
    """The pooled multiplier through both families' interior vertices."""
    good_l = [p for p in lm2.n_parabolas if not p.flag]
    good_v = [p for p in vanilla.n_parabolas if not p.flag]
    return pooled_multiplier([p.budget for p in good_l], [p.loss_at_vertex for p in good_l],
                             [p.budget for p in good_v], [p.loss_at_vertex for p in good_v])


def holdout_check(points: List[Point]) -> dict:
    """Fit without the largest rung, predict it."""
    largest = max(p.rung for p in points)
    train = [p for p in points if p.rung != largest]
    test = [p for p in points if p.rung == largest]
    if len({p.rung for p in train}) < 2 or len(train) < 6 or not test:
        return dict(rung=largest, error="too few runs below the largest rung for a fit")
    fit = fit_parametric([p.n for p in train], [p.d for p in train], [p.loss for p in train])
    predictions = [dict(run_id=p.run_id, loss=p.loss, predicted=float(fit.predict(p.n, p.d)),
                        relative_error=float(fit.predict(p.n, p.d) / p.loss - 1)) for p in test]
    return dict(rung=largest, runs=predictions,
                mean_abs_relative_error=float(np.mean([abs(p["relative_error"]) for p in predictions])))


def run_study(points: List[Point], samples: int = 200, seed: int = 0, level: float = 0.90) -> Study:
    rng = np.random.default_rng(seed)
    families = sorted({p.family for p in points})
    notes = []
    iso, groups_by_family = {}, {}
    for family in families:
        groups = isoflop_groups(points, family)
        if groups:
            groups_by_family[family] = groups
            iso[family] = fit_isoflop(groups, family)
            for par in iso[family].n_parabolas:
                if par.flag:
                    notes.append(f"{family} budget {par.budget:.3g}: FLAGGED, {par.flag} (not an optimum)")
            if iso[family].frontier_kind == "lowest loss per budget":
                notes.append(f"{family}: fewer than 2 interior isoFLOP minima; its loss frontier uses the lowest "
                             f"loss per budget (an upper bound on the optimal loss)")
    parametric, par_ci, holdout = {}, {}, {}
    for family in families:
        pts = [p for p in points if p.family == family]
        if len(pts) < 6 or len({p.rung for p in pts}) < 2:
            notes.append(f"{family}: {len(pts)} runs, too few for the parametric L(N, D) fit")
            continue
        parametric[family] = fit_parametric([p.n for p in pts], [p.d for p in pts], [p.loss for p in pts])
        par_ci[family] = bootstrap_parametric(pts, parametric[family], samples, rng, level) if samples else {}
        holdout[family] = holdout_check(pts)
    iso_ci = bootstrap_isoflop(groups_by_family, iso, samples, rng, level) if samples and iso else {}
    mult = multipliers(iso["lm2"], iso["vanilla"]) if "lm2" in iso and "vanilla" in iso else {}
    best_run = {}
    if "lm2" in iso and "vanilla" in iso and not mult:
        notes.append("no compute-optimal multiplier: no LM2 budget has an interior minimum (or vanilla has no "
                     "frontier); the best-run multiplier below compares the grids' best runs instead")
        best_run = best_run_multipliers(iso["lm2"], iso["vanilla"])
    pooled, extrapolated = None, []
    if "lm2" in iso and "vanilla" in iso:
        pooled = pooled_from_fits(iso["lm2"], iso["vanilla"])
        front, _ = frontier_points(iso["vanilla"])
        if front:
            extrapolated = [b for b, m in mult.items() if not min(front) <= b * m <= max(front)]
        if pooled is not None and pooled.extrapolated:
            notes.append("pooled multiplier: LM2 budget(s) " + ", ".join(f"{b:.3g}" for b in pooled.extrapolated)
                         + " shift beyond vanilla's budgets: there it rests on the fitted curve's shape, "
                           "not on vanilla runs (add a larger vanilla budget)")
    return Study(iso, parametric, par_ci, iso_ci, holdout, mult, notes, best_run, pooled, extrapolated)


def _ci(pair) -> str:
    return "n/a" if not pair else f"[{pair[0]:.4g}, {pair[1]:.4g}]"


def format_study(study: Study, level: float = 0.90) -> str:
    pct = f"{level:.0%}"
    lines = []
    for family, fit in study.isoflop.items():
        lines.append(f"== {family}: isoFLOP ({len(fit.n_parabolas)} budgets)")
        cis = study.isoflop_intervals.get(family, {})
        for par, dpar in zip(fit.n_parabolas, fit.d_parabolas):
            if par.flag:
                lines.append(f"  C {par.budget:.3g}: FLAGGED ({par.flag})")
            else:
                lines.append(f"  C {par.budget:.3g}: N* {par.vertex:.4g} {pct} {_ci(cis.get('n_star', {}).get(par.budget))}"
                             f" | D* {dpar.vertex if dpar.vertex else float('nan'):.4g} | L* {par.loss_at_vertex:.4f}")
        if fit.n_law:
            lines.append(f"  N*(C) = {fit.n_law[0]:.4g} C^{fit.n_law[1]:.4f}  exponent {pct} {_ci(cis.get('n_exponent'))}")
        else:
            lines.append("  N*(C): n/a (needs 2 budgets with interior minima)")
        if fit.d_law:
            lines.append(f"  D*(C) = {fit.d_law[0]:.4g} C^{fit.d_law[1]:.4f}  exponent {pct} {_ci(cis.get('d_exponent'))}")
        if fit.frontier:
            lines.append(f"  loss frontier ({fit.frontier_kind}): L*(C) = {math.exp(fit.frontier[0]):.4g} C^{fit.frontier[1]:.4f}")
    for family, fit in study.parametric.items():
        ci = study.parametric_intervals.get(family, {})
        lines.append(f"== {family}: L(N, D) = E + A/N^alpha + B/D^beta (Huber on log loss)")
        for key, value in fit.as_dict().items():
            lines.append(f"  {key:<6} {value:.4g}  {pct} {_ci(ci.get(key))}")
        hold = study.holdout.get(family, {})
        if "runs" in hold:
            lines.append(f"  held out rung {hold['rung']}: mean |relative error| {hold['mean_abs_relative_error']:.2%} "
                         f"over {len(hold['runs'])} runs")
        elif hold:
            lines.append(f"  held out rung {hold['rung']}: {hold['error']}")
    if study.pooled is not None:
        ci = study.isoflop_intervals.get("lm2", {}).get("pooled_multiplier")
        shape = "quadratic" if study.pooled.degree == 2 else "line"
        lines.append(f"== LM2-vs-vanilla compute multiplier, pooled across budgets: {study.pooled.multiplier:.3f}x  "
                     f"{pct} {_ci(ci)}  (one shift of vanilla's frontier, a {shape} in log C; "
                     f"fit rms {study.pooled.residual_rms:.2e} in log L)")
        if study.pooled.extrapolated:
            lines.append("  EXTRAPOLATED at LM2 budget(s) " + ", ".join(f"{b:.3g}" for b in study.pooled.extrapolated))
    if study.multiplier:
        ci = study.isoflop_intervals.get("lm2", {}).get("multiplier", {})
        lines.append("== per-budget multipliers (a diagnostic: vanilla compute for LM2's optimal loss / LM2 compute)")
        for budget, value in sorted(study.multiplier.items()):
            tag = "  EXTRAPOLATED (beyond vanilla's budgets)" if budget in study.extrapolated else ""
            lines.append(f"  C {budget:.3g}: {value:.3f}x  {pct} {_ci(ci.get(budget))}{tag}")
    if study.best_run_multiplier:
        ci = study.isoflop_intervals.get("lm2", {}).get("best_run_multiplier", {})
        lines.append("== LM2-vs-vanilla BEST-RUN multiplier (grids' lowest losses; NOT compute-optimal: edge minima)")
        for budget, value in sorted(study.best_run_multiplier.items()):
            lines.append(f"  C {budget:.3g}: {value:.3f}x  {pct} {_ci(ci.get(budget))}")
    for note in study.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def study_json(study: Study) -> dict:
    def par(p: Parabola) -> dict:
        return dict(budget=p.budget, coefficients=list(p.coefficients), vertex=p.vertex,
                    loss_at_vertex=p.loss_at_vertex, flag=p.flag)

    return dict(
        isoflop={f: dict(n_parabolas=[par(p) for p in fit.n_parabolas], d_parabolas=[par(p) for p in fit.d_parabolas],
                         n_law=fit.n_law, d_law=fit.d_law, frontier=fit.frontier, frontier_kind=fit.frontier_kind)
                 for f, fit in study.isoflop.items()},
        isoflop_intervals={f: {k: ({str(b): v for b, v in val.items()} if isinstance(val, dict) else val)
                               for k, val in ci.items()} for f, ci in study.isoflop_intervals.items()},
        parametric={f: p.as_dict() for f, p in study.parametric.items()},
        parametric_intervals=study.parametric_intervals, holdout=study.holdout,
        multiplier={str(b): v for b, v in study.multiplier.items()},
        best_run_multiplier={str(b): v for b, v in study.best_run_multiplier.items()},
        pooled_multiplier=(None if study.pooled is None else dict(
            value=study.pooled.multiplier, degree=study.pooled.degree, extrapolated=study.pooled.extrapolated,
            residual_rms=study.pooled.residual_rms,
            interval=study.isoflop_intervals.get("lm2", {}).get("pooled_multiplier"))),
        extrapolated_budgets=study.extrapolated, notes=study.notes)
