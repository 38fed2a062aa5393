"""The model's fields are declared once (megatron_lm2.config: LM2Config's knobs and MEGATRON_KNOBS).
lm2-train's model flags, the checkpoint record lm2_config.json and the converter's field lists are
derived from that declaration; the exported Hugging Face config keeps a copy (it must stand alone),
checked here against it field by field. The flag generator is driven by types, not a table."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch

from megatron_lm2.config import MODEL_FIELDS, ConfigError
from megatron_lm2.flavors import get_flavor
from megatron_lm2.training.config import _f

HF_CONFIG = Path(__file__).resolve().parent.parent / "megatron_lm2" / "convert" / "hf_lm2" / "configuration_lm2.py"


def _standalone_hf_config():
    """configuration_lm2.py loaded from its file alone, as an exported folder loads it."""
    spec = importlib.util.spec_from_file_location("exported_configuration_lm2", HF_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the HF copy
def test_hf_config_copy_agrees_with_the_declaration():
    hf = _standalone_hf_config()
    params = inspect.signature(hf.LM2Config.__init__).parameters
    declared = {knob.name: knob for knob in MODEL_FIELDS if knob.hf}
    assert {"memory_slots", "memory_write", "memory_layers"} <= set(declared)
    for name, knob in declared.items():
        assert name in params, f"the HF config lacks {name}"
        assert params[name].default == knob.default, (name, params[name].default, knob.default)
        assert hf.CHOICES.get(name) == knob.choices, (name, hf.CHOICES.get(name), knob.choices)
    # And the other way: every LM2 knob the HF config has is declared (a knob added there only
    # would never reach a converted model).
    hf_knobs = {name for name in params if name.startswith("memory_") or name == "attention_window"}
    assert hf_knobs == set(declared)
    assert set(hf.CHOICES) <= set(declared)
    # What it checks with the copy is what LM2Config checks.
    for name, choices in hf.CHOICES.items():
        with pytest.raises(ValueError, match=name):
            hf.LM2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, **{name: "bogus"})
        assert choices


def test_hf_side_fields_come_from_the_declaration():
    from megatron_lm2.convert.megatron_config import ARCH_FIELDS, HF_FIELDS, from_hf_config, to_hf_config

    assert ARCH_FIELDS == tuple(knob.name for knob in MODEL_FIELDS)
    assert HF_FIELDS == tuple(knob.name for knob in MODEL_FIELDS if knob.hf)
    config = get_flavor("debug", memory_layers=(2, 4), memory_init="learned", attention_window=128,
                        memory_scores="qknorm", memory_logit_scale=7.5, memory_forget_bias=2.0)
    hf = to_hf_config(config)
    for name in HF_FIELDS:
        if name != "memory_layers":
            assert getattr(hf, name) == getattr(config, name), name
    back = from_hf_config(hf, vocab_size=config.vocab_size)
    for knob in MODEL_FIELDS:
        if knob.name != "memory_bptt_chunks":  # training only: HF has no such knob
            assert getattr(back, knob.name) == getattr(config, knob.name), knob.name


def test_hf_folder_exported_before_a_knob_existed_converts_with_its_default():
    """An exported folder carries its own configuration_lm2.py: one written before
    memory_scores existed has no such attribute, and meant the dot-product scores."""
    from megatron_lm2.convert.megatron_config import from_hf_config, to_hf_config

    hf = to_hf_config(get_flavor("debug"))
    for name in ("memory_scores", "memory_logit_scale"):
        delattr(hf, name)
    back = from_hf_config(hf, vocab_size=hf.vocab_size)
    assert back.memory_scores == "dot" and back.memory_logit_scale == 10.0
    delattr(hf, "memory_slots")  # a knob every export has: its absence is an error, not a default
    with pytest.raises(AttributeError):
        from_hf_config(hf, vocab_size=hf.vocab_size)


# ------------------------------------------------------------------ lm2-train's flags
def test_model_flags_are_the_declared_fields():
    from megatron_lm2.training.config import ModelFlags, TrainConfig, build_parser

    actions = {action.dest: action for action in build_parser()._actions}
    flags = [knob for knob in MODEL_FIELDS if knob.flag]
    assert TrainConfig.MODEL_FIELDS == tuple(knob.name for knob in flags)
    assert issubclass(TrainConfig, ModelFlags)
    for knob in flags:
        action = actions[knob.name]
        assert action.option_strings == ["--" + knob.name.replace("_", "-")]
        assert action.default is None  # keep the flavor's value
        assert action.help == knob.help
        assert (tuple(action.choices) if action.choices else None) == knob.choices, knob.name
    for knob in MODEL_FIELDS:
        if not knob.flag:
            assert knob.name not in actions, knob.name
    assert actions["memory_layers"].nargs == "+"


def test_flags_parse_by_type(capsys):
    from megatron_lm2.training.config import parse_args

    config = parse_args(["--flavor", "debug", "--memory-layers", "3", "1", "--data-path", "a", "b",
                         "--dry-run"], world_size=1)
    assert config.memory_layers == (3, 1)  # a tuple of ints at the edge
    assert config.model_config().memory_layers == (1, 3)
    assert config.data_path == ["a", "b"]  # list[str]: a list
    for argv, message in [
        (["--memory-layers", "1", "x"], "argument --memory-layers: expected int, got 'x'"),
        (["--memory-write", "bogus"], "argument --memory-write: invalid choice: 'bogus'"),
        (["--memory-slots", "0"], "argument --memory-slots: must be > 0, got 0"),
        # LM2Config names fields; lm2-train's message names the flags.
        (["--flavor", "debug", "--memory-layers", "0", "5"], "--memory-layers=[0, 5] has layer numbers [0, 5] "
                                                             "outside 1..--num-layers=4"),
        (["--flavor", "debug", "--memory-heads", "3"], "--memory-heads=3 must divide --hidden-size=128"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["--mock-data", *argv], world_size=1)
        assert message in capsys.readouterr().err, argv


@dataclass(kw_only=True)
class _NewTypes:
    path: Optional[Path] = _f(None, "a path")
    mode: Literal["fast", "slow"] = _f("fast", "a mode")
    sizes: tuple[int, ...] = _f((1,), "sizes")
    names: Optional[list[str]] = _f(None, "names")
    ratio: Optional[float] = _f(None, "a ratio", positive=True)
    quiet: bool = _f(False, "no output")


def test_a_field_of_a_new_type_needs_no_table():
    from megatron_lm2.cli_args import ArgumentParser
    from megatron_lm2.training.config import add_flags

    parser = ArgumentParser(prog="new-types")
    add_flags(parser, _NewTypes)
    ns = parser.parse_args(["--path", "/tmp/x", "--mode", "slow", "--sizes", "2", "3", "--names", "a", "b",
                            "--ratio", "0.5", "--quiet"])
    assert isinstance(ns.path, Path) and ns.path == Path("/tmp/x")
    assert (ns.mode, ns.sizes, ns.names, ns.ratio, ns.quiet) == ("slow", (2, 3), ["a", "b"], 0.5, True)
    defaults = parser.parse_args([])
    assert (defaults.path, defaults.mode, defaults.sizes, defaults.quiet) == (None, "fast", (1,), False)
    for argv in (["--mode", "medium"], ["--ratio", "-1"], ["--sizes", "two"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_config_error_names_knobs_by_field_or_by_flag():
    error = ConfigError("{memory_chunk_size} does not divide {seq_length}", memory_chunk_size=100, seq_length=256)
    assert str(error) == "memory_chunk_size=100 does not divide seq_length=256"
    flagged = error.named(lambda name: "--" + name.replace("_", "-"))
    assert str(flagged) == "--memory-chunk-size=100 does not divide --seq-length=256"
    assert str(ConfigError("{memory_write}: no", memory_write="x")) == "memory_write='x': no"
    assert str(ConfigError("plain text {not a template}")) == "plain text {not a template}"


# ------------------------------------------------------------------ lm2_config.json
def test_record_holds_every_declared_field_and_round_trips():
    from megatron_lm2.convert.megatron_config import config_from_dict, config_to_dict

    config = get_flavor("lm2-1.7b-mem6", memory_init="learned", attention_window=1024, memory_bptt_chunks=2,
                        memory_scores="qknorm", memory_logit_scale=5.0, memory_forget_bias=-1.5,
                        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, tie_embeddings=True,
                        rotary_base=500000, vocab_size=50304)
    record = json.loads(json.dumps(config_to_dict(config)))  # JSON-serialisable
    assert list(record) == [knob.name for knob in MODEL_FIELDS]
    assert record["params_dtype"] == "bfloat16" and record["memory_layers"] == [1, 2, 3, 4, 5, 6]
    back = config_from_dict(record)
    for knob in MODEL_FIELDS:
        assert getattr(back, knob.name) == getattr(config, knob.name), knob.name
    assert back.pipeline_dtype == torch.bfloat16 and back.normalization == "RMSNorm"


def test_record_must_name_every_field():
    from megatron_lm2.convert.megatron_config import config_from_dict, config_to_dict

    record = config_to_dict(get_flavor("lm2-1.7b"))
    with pytest.raises(ConfigError, match=r"rec: missing model field\(s\) \['hidden_size', 'memory_slots'\]"):
        config_from_dict({k: v for k, v in record.items() if k not in ("hidden_size", "memory_slots")}, "rec")
    with pytest.raises(ConfigError, match=r"unknown model field\(s\) \['memory_slot'\]"):
        config_from_dict({**record, "memory_slot": 3})
    with pytest.raises(ConfigError, match="params_dtype='float77': not a torch dtype"):
        config_from_dict({**record, "params_dtype": "float77"})
    # Fields newer than the first records may be absent: their defaults are what older models did.
    older = {k: v for k, v in record.items() if k not in ("params_dtype", "attention_window", "memory_bptt_chunks")}
    config = config_from_dict(older)
    assert (config.params_dtype, config.attention_window, config.memory_bptt_chunks) == (torch.float32, None, None)
    assert config.memory_slots == record["memory_slots"] == 512  # the record's value, not a flavor's (debug has 32)


def test_old_checkpoint_flags_rebuild_without_the_flag_parser():
    """A checkpoint from before lm2_config.json: the run's saved flags (argparse gave
    memory_layers as strings) give the model TrainConfig built, without TrainConfig."""
    from megatron_lm2.convert.megatron_config import config_from_run_flags
    from megatron_lm2.training.config import TrainConfig

    run = TrainConfig(flavor="debug", memory_layers=["3", "1"], memory_slots=64, memory_write="aligned",
                      num_layers=3, lr=1e-3, bf16=False)
    saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in run.to_dict().items()}
    expected = run.model_config()
    rebuilt = config_from_run_flags(saved, vocab_size=expected.vocab_size)
    for knob in MODEL_FIELDS:
        assert getattr(rebuilt, knob.name) == getattr(expected, knob.name), knob.name
    assert rebuilt.memory_layers == (1, 3)
    with pytest.raises(ConfigError, match="ckpt: the run's saved flags do not build a model: unknown flavor"):
        config_from_run_flags({**saved, "flavor": "lm2-70b"}, source="ckpt")


def test_conversion_and_evaluation_do_not_import_the_trainer_config():
    code = ("import sys; import megatron_lm2.convert.megatron_io, megatron_lm2.convert.to_hf, "
            "megatron_lm2.convert.from_hf, megatron_lm2.eval.backends; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron_lm2.training')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.strip().splitlines()[-1]
    assert "megatron_lm2.training.config" not in loaded, loaded
