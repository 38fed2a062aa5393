"""The megatron-core version guard (megatron_lm2/compat.py) and the install pins that must agree
with it: setup.py's requirement and constraints.txt (the versions CI last passed with)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from packaging.version import Version

from megatron_lm2.compat import (
    MEGATRON_CORE_RANGE,
    UnsupportedMegatronCore,
    check_megatron_core_version,
)

ROOT = Path(__file__).resolve().parent.parent


def test_installed_megatron_core_is_accepted():
    from megatron.core import package_info

    assert check_megatron_core_version() == package_info.__version__


@pytest.mark.parametrize("version", ["0.15.0", "0.16.0", "0.20.0", "1.0.0"])
def test_other_releases_are_refused_with_the_range(version):
    with pytest.raises(UnsupportedMegatronCore) as info:
        check_megatron_core_version(version)
    message = str(info.value)
    assert version in message and "megatron_lm2/compat.py" in message
    assert f">={MEGATRON_CORE_RANGE[0]},<{MEGATRON_CORE_RANGE[1]}" in message


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.19.2"])
def test_releases_inside_the_range_pass(version):
    assert check_megatron_core_version(version) == version


def test_setup_py_requires_the_same_range():
    low, high = MEGATRON_CORE_RANGE
    assert f'"megatron-core>={low},<{high}"' in (ROOT / "setup.py").read_text()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"constraints.txt: not an exact pin: {line!r}"
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_constraints_pin_the_stack_inside_the_supported_range():
    pins = _pins()
    for name in ("megatron-core", "torch", "transformers", "tokenizers", "sentencepiece", "numpy"):
        assert name in pins, f"constraints.txt has no pin for {name}"
    low, high = MEGATRON_CORE_RANGE
    assert Version(low) <= Version(pins["megatron-core"]) < Version(high)


def test_oldest_transformers_pin_is_setup_pys_lower_bound():
    """tests/run.sh runs the exported model's tests on this release: it must be the oldest
    that setup.py allows, so the claim "4.46 to the newest" is what CI checks."""
    floor = re.search(r'"transformers>=([0-9.]+)"', (ROOT / "setup.py").read_text()).group(1)
    pinned = re.search(r"^transformers==([0-9.]+)$", (ROOT / "tests/transformers-oldest.txt").read_text(), re.M)
    assert pinned, "tests/transformers-oldest.txt pins no transformers"
    assert Version(pinned.group(1)).release[:2] == Version(floor).release[:2]


# ------------------------------------------------------------- Transformer Engine (issue 34)
@pytest.mark.parametrize("version", ["2.9.0", "2.10.0+cu12", "2.11.0", "2.11.0.dev0+abc"])
def test_transformer_engine_inside_the_range_is_quiet(version):
    from megatron_lm2.compat import transformer_engine_version_problem

    assert transformer_engine_version_problem(version) is None


@pytest.mark.parametrize("version", ["2.8.0", "1.13.0", "2.12.0", "2.12.0.dev0", "3.0", "not-a-version"])
def test_transformer_engine_outside_the_range_is_one_warning_line(version):
    from megatron_lm2.compat import TRANSFORMER_ENGINE_RANGE, transformer_engine_version_problem

    problem = transformer_engine_version_problem(version)
    low, high = TRANSFORMER_ENGINE_RANGE
    assert problem and "\n" not in problem and version in problem and f">={low},<{high}" in problem


def test_an_unsupported_installed_transformer_engine_is_warned_not_refused(monkeypatch, caplog):
    import sys
    import types

    from megatron_lm2.compat import warn_if_unsupported_transformer_engine

    monkeypatch.setitem(sys.modules, "transformer_engine", types.SimpleNamespace(__version__="2.13.0"))
    monkeypatch.setattr(logging.getLogger("megatron_lm2"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="megatron_lm2"):
        problem = warn_if_unsupported_transformer_engine()
    assert problem and "2.13.0" in problem
    assert [r.getMessage() for r in caplog.records if r.name == "megatron_lm2"] == [problem]
    monkeypatch.setitem(sys.modules, "transformer_engine", types.SimpleNamespace(__version__="2.10.0"))
    assert warn_if_unsupported_transformer_engine() is None


def test_setup_py_gpu_extra_requires_the_transformer_engine_range():
    from megatron_lm2.compat import TRANSFORMER_ENGINE_RANGE

    low, high = TRANSFORMER_ENGINE_RANGE
    assert f'"transformer-engine[pytorch]>={low},<{high}"' in (ROOT / "setup.py").read_text()
