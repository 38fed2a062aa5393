"""The divergence guard (issue 35): a finite but diverged run halts before it saves, naming the
last good checkpoint; the guard stays quiet on the project's own training settings (the
quickstart, the memory study's runs, the scaling demo), with margin: they pass with the bounds
made 100x (weights) and 2x (loss) stricter than the defaults."""

import json
import os

import pytest

from megatron_lm2.training.divergence import (DEFAULT_LOSS_FACTOR, DEFAULT_LOSS_PATIENCE,
                                              DEFAULT_MAX_WEIGHT_RMS, MIN_HISTORY, DivergenceGuard)
from tests.test_faults import COMMON, _one_line_error, _train, _train_records


# ------------------------------------------------------------------ the decision function
def _replay(losses, **kw):
    guard = DivergenceGuard(**kw)
    for step, loss in enumerate(losses, 1):
        verdict = guard.observe(loss, None)
        if verdict:
            return step, verdict
    return None


def test_loss_signal_fires_after_patience_and_ignores_a_spike():
    healthy = [3.0] * MIN_HISTORY
    # A spike of patience - 1 steps that recovers is not divergence...
    assert _replay(healthy + [20.0] * (DEFAULT_LOSS_PATIENCE - 1) + [3.0] * 50) is None
    # ...the same level held for `patience` steps is, on exactly that step.
    step, verdict = _replay(healthy + [20.0] * 100)
    assert step == MIN_HISTORY + DEFAULT_LOSS_PATIENCE and "running median 3" in verdict
    # Just under the factor never fires; the spikes are kept out of the median they are judged by.
    assert _replay(healthy + [3.0 * DEFAULT_LOSS_FACTOR * 0.99] * 500) is None
    assert _replay(healthy + [20.0] * 100, loss_factor=0) is None  # off


def test_weight_signal_fires_above_the_bound_only():
    guard = DivergenceGuard()
    assert guard.observe(3.0, DEFAULT_MAX_WEIGHT_RMS * 0.99) is None
    assert "--max-weight-rms" in guard.observe(3.0, DEFAULT_MAX_WEIGHT_RMS * 1.01)
    assert DivergenceGuard(max_weight_rms=0).observe(3.0, 1e30) is None


# ------------------------------------------------------- the three trials, real processes
@pytest.mark.parametrize("argv", [["--lr", "1e6"], ["--lr", "1e30"], ["--weight-decay", "1e30"]],
                         ids=["lr-1e6", "lr-1e30", "weight-decay-1e30"])
def test_diverged_finite_run_halts_before_saving_naming_the_last_good(tmp_path, argv):
    """Issue 35's trials saved finite checkpoints with max |w| of 5e10 .. 5e29 as known good.
    Step 1 is taken at warmup's lr 0 (a sane checkpoint); step 2 diverges and nothing after
    step 1 is saved."""
    from megatron_lm2.training.integrity import known_good

    directory = str(tmp_path / "ckpt")
    line = _one_line_error(_train(*COMMON, "--train-iters", "6", "--save", directory, "--save-interval", "1",
                                  "--keep-last", "0", *argv), "lm2-train")
    good = os.path.join(directory, "iter_0000001")
    assert "diverged" in line and "--max-weight-rms" in line and f"checkpoint is {good}" in line, line
    assert sorted(e for e in os.listdir(directory) if e.startswith("iter_")) == ["iter_0000001"]
    assert known_good(good) is True


# ------------------------------------------------ quiet on the project's own settings
SETTINGS = {
    # docs/training.md's quickstart (its smoke run: the default --lr 2e-4 and weight decay 0.1)
    "quickstart": ["--flavor", "debug", "--mock-data", "--lr-warmup-iters", "5", "--micro-batch-size", "4",
                   "--global-batch-size", "8", "--seq-length", "256"],
    # benchmarks/memory_scaling.py: AdamW lr 3e-3, betas (0.9, 0.95), no weight decay
    "memory-study": ["--flavor", "debug", "--mock-data", "--lr", "3e-3", "--weight-decay", "0",
                     "--adam-beta2", "0.95", "--lr-warmup-iters", "1", "--micro-batch-size", "8",
                     "--global-batch-size", "8", "--seq-length", "128", "--memory-chunk-size", "64"],
    # examples/scaling_demo.sh: lr clamped at 3e-3, 8-sequence batches of 128 tokens
    "scaling-demo": ["--flavor", "debug", "--mock-data", "--lr", "3e-3", "--lr-warmup-iters", "3",
                     "--micro-batch-size", "8", "--global-batch-size", "8", "--seq-length", "128",
                     "--memory-chunk-size", "64"],
}
STRICT = ["--max-weight-rms", str(DEFAULT_MAX_WEIGHT_RMS / 100), "--divergence-loss-factor",
          str(DEFAULT_LOSS_FACTOR / 2), "--divergence-loss-steps", "1"]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_guard_is_quiet_on_the_projects_settings(tmp_path, name):
    directory = str(tmp_path / "ckpt")
    result = _train(*SETTINGS[name], *STRICT, "--train-iters", "25", "--log-interval", "1",
                    "--save", directory, "--save-interval", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [r["loss"] for r in _train_records(os.path.join(directory, "metrics.jsonl"))]
    assert len(losses) == 25 and losses[-1] < losses[0]
    # The decision function on the recorded curve, at the strict loss bound, from step 1 on.
    assert _replay(losses, loss_factor=DEFAULT_LOSS_FACTOR / 2, loss_patience=1) is None
