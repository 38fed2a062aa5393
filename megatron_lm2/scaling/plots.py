"""PNG plots of a fitted study: isoFLOP curves, loss vs compute per family, the frontier."""

from __future__ import annotations

import math
import os
from typing import Dict, List

import numpy as np

from megatron_lm2.fileio import atomic_path
from megatron_lm2.scaling.fit import Point, Study, isoflop_groups

COLORS = {"lm2": "tab:blue", "vanilla": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    with atomic_path(path, suffix=".png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def plot_isoflop(points: List[Point], study: Study, path: str) -> str:
    plt = _pyplot()
    families = list(study.isoflop)
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(6 * max(1, len(families)), 4.5), squeeze=False)
    for ax, family in zip(axes[0], families):
        groups = isoflop_groups(points, family)
        cmap = plt.get_cmap("viridis")
        for i, (par, (budget, pts)) in enumerate(zip(study.isoflop[family].n_parabolas, groups.items())):
            color = cmap(i / max(1, len(groups) - 1))
            n = np.array([p.n for p in pts])
            ax.scatter(n, [p.loss for p in pts], color=color, s=18)
            if not any(math.isnan(c) for c in par.coefficients):
                xs = np.linspace(np.log(n.min()), np.log(n.max()), 50)
                ax.plot(np.exp(xs), np.polyval(par.coefficients, xs), color=color,
                        linestyle="--" if par.flag else "-", label=f"C={budget:.2g}" + (" (edge)" if par.flag else ""))
            if par.vertex and not par.flag:
                ax.plot([par.vertex], [par.loss_at_vertex], marker="*", color=color, markersize=11)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{family}: isoFLOP curves (dashed: minimum at an edge)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loss_vs_compute(points: List[Point], study: Study, path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for family in sorted({p.family for p in points}):
        pts = [p for p in points if p.family == family]
        ax.scatter([p.c for p in pts], [p.loss for p in pts], s=14, alpha=0.6, color=COLORS.get(family),
                   label=f"{family} runs")
        fit = study.isoflop.get(family)
        if fit and fit.frontier:
            cs = np.logspace(np.log10(min(p.c for p in pts)), np.log10(max(p.c for p in pts)), 50)
            ax.plot(cs, np.exp(fit.frontier[0] + fit.frontier[1] * np.log(cs)), color=COLORS.get(family),
                    label=f"{family} frontier ({fit.frontier_kind})")
    ax.set_xscale("log")
    ax.set_xlabel("executed training compute (FLOPs)")
    ax.set_ylabel("validation loss")
    title = "loss vs compute"
    if study.multiplier:
        budget = max(study.multiplier)
        title += f" | LM2 multiplier at C={budget:.2g}: {study.multiplier[budget]:.2f}x"
    elif study.best_run_multiplier:
        budget = max(study.best_run_multiplier)
        title += f" | best-run multiplier at C={budget:.2g}: {study.best_run_multiplier[budget]:.2f}x"
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_frontier(study: Study, path: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for family, fit in study.isoflop.items():
        for ax, parabolas, law, name in ((axes[0], fit.n_parabolas, fit.n_law, "N*"),
                                         (axes[1], fit.d_parabolas, fit.d_law, "D*")):
            good = [p for p in parabolas if not p.flag]
            ax.scatter([p.budget for p in good], [p.vertex for p in good], color=COLORS.get(family), label=f"{family} {name}")
            if law:
                cs = np.logspace(np.log10(min(p.budget for p in parabolas)), np.log10(max(p.budget for p in parabolas)), 20)
                ax.plot(cs, law[0] * cs ** law[1], color=COLORS.get(family), label=f"{family}: {name} ∝ C^{law[1]:.3f}")
            ax.set_xscale("log")
            if good:
                ax.set_yscale("log")
            ax.set_xlabel("compute C (FLOPs)")
            ax.set_ylabel(name)
            ax.legend(fontsize=7)
    for ax in axes:
        if not ax.collections:
            ax.text(0.5, 0.5, "no interior isoFLOP minimum\n(every budget flagged)", ha="center", va="center",
                    transform=ax.transAxes)
    axes[0].set_title("compute-optimal parameters")
    axes[1].set_title("compute-optimal tokens")
    return _save(fig, path)


def plot_all(points: List[Point], study: Study, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    return dict(isoflop=plot_isoflop(points, study, os.path.join(out_dir, "isoflop.png")),
                loss_vs_compute=plot_loss_vs_compute(points, study, os.path.join(out_dir, "loss_vs_compute.png")),
                frontier=plot_frontier(study, os.path.join(out_dir, "frontier.png")))
