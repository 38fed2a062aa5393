"""Megatron <-> Hugging Face conversion (megatron_lm2.convert, `lm2-convert`).

Checkpoints are made here: Megatron models at TP=2 and at PP=2 (two processes), saved with
dist_checkpointing. The references are those same Megatron models' logits and memory banks,
computed in the processes that saved them (TP=2 forward; PP=2 forward through Megatron's
pipeline schedule). The HF side is loaded with AutoModelForCausalLM(trust_remote_code=True).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from megatron_lm2.testing import run_distributed

HF_CODE = Path(__file__).resolve().parent.parent / "megatron_lm2" / "convert" / "hf_lm2"
BATCH, SEQ = 2, 256
TOL = 1e-4

# name -> flavor overrides; every variant is saved at TP=2, the first two also at PP=2.
VARIANTS = {
    "debug": dict(flavor="debug"),
    "vanilla": dict(flavor="debug-vanilla"),
    "aligned": dict(flavor="debug", memory_write="aligned", memory_slots=64),
    "token": dict(flavor="debug", memory_write="token", memory_slots=64),
    "learned": dict(flavor="debug", memory_init="learned", memory_layers=(2, 3), memory_write_shift=2),
    "qknorm": dict(flavor="debug", memory_scores="qknorm"),
    "qknorm-token": dict(flavor="debug", memory_write="token", memory_slots=64, memory_scores="qknorm"),
    # The study's association config: the token write with qknorm, a forget bias, a write shift and
    # keys tied to queries at init (the recipes' memory since issue 10, 2026-12-06 at 097fc56).
    "forget-bias": dict(flavor="debug", memory_write="token", memory_slots=64, memory_scores="qknorm",
                        memory_forget_bias=3.0, memory_write_shift=1, memory_qk_init="tied"),
    # N = 192 > d = 128: slots past d start as sign rows the HF file computes on its own.
    "identity-signs": dict(flavor="debug", memory_slots=192, memory_init="identity-signs"),
}
PP_VARIANTS = ("debug", "vanilla")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


def _tokens():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, 2048, (BATCH, SEQ), generator=generator)


# ------------------------------------------------------------------ made in 2 processes
def _build(spec):
    from megatron.core import parallel_state as ps

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.model import build_model

    fields = {k: v for k, v in spec.items() if k != "flavor"}
    config = get_flavor(
        spec["flavor"],
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        **fields,
    )
    model = build_model(config).eval()
    # Spread the memory weights so the memory branch moves the logits well beyond the
    # tolerance (the default init leaves it a small perturbation).
    generator = torch.Generator().manual_seed(100 + torch.distributed.get_rank())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".memory." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return config, model


def _save(model, config, directory):
    from megatron.core import dist_checkpointing

    from megatron_lm2.convert.megatron_config import write_config

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), directory)
    if torch.distributed.get_rank() == 0:
        write_config(config, os.path.join(directory, "lm2_config.json"))
    _record(directory)


def _record(directory):
    """The integrity record lm2-train writes (collective): without it a checkpoint is refused."""
    from megatron_lm2.training.integrity import write_record

    torch.distributed.barrier()
    write_record(str(directory), 0, True, "test")


def _gather_tp(tensor):
    """Concatenate TP ranks' shards along the last dim (vocab of logits, columns of banks)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _tp_logits_and_banks(model, config, tokens):
    from megatron_lm2.memory_state import carry_memory, memory_banks
    from megatron_lm2.model import attention_mask

    position = torch.arange(SEQ).expand(BATCH, -1)
    with torch.no_grad():
        logits = _gather_tp(model(tokens, position, attention_mask(SEQ, config.attention_window)))
        # The bank after chunk k of the full sequence = the bank a carried forward over the
        # first k chunks leaves (the forward is causal).
        banks = []
        chunk = config.memory_chunk_size
        if config.has_memory:
            for k in range(1, SEQ // chunk + 1):
                with carry_memory(model):
                    length = k * chunk
                    model(tokens[:, :length], position[:, :length], attention_mask(length))
                    banks.append({n: _gather_tp(b) for n, b in memory_banks(model).items()})
    return logits, banks


def _pp_logits(model, config, tokens):
    """Logits through Megatron's own pipeline schedule (forward only, 2 stages)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lm2.model import attention_mask

    position = torch.arange(SEQ).expand(BATCH, -1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, position, attention_mask(SEQ, config.attention_window))
        return output, lambda out, non_loss_data=False: out.detach().clone()

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs[0] if ps.is_pipeline_last_stage() and outputs else None


def _make_checkpoints(root):
    """Runs in 2 processes: TP=2 checkpoints and references, then PP=2 ones."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tokens = _tokens()
    references = {}
    for name, spec in VARIANTS.items():
        config, model = _build(spec)
        _save(model, config, os.path.join(root, f"{name}-tp2"))
        references[f"{name}-tp2"] = _tp_logits_and_banks(model, config, tokens)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    model_parallel_cuda_manual_seed(4321)
    for name in PP_VARIANTS:
        config, model = _build(VARIANTS[name])
        _save(model, config, os.path.join(root, f"{name}-pp2"))
        logits = _pp_logits(model, config, tokens)
        if logits is not None:
            references[f"{name}-pp2"] = (logits, [])
    return references


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    per_rank = run_distributed(_make_checkpoints, 2, str(root), tp=2)
    references = {}
    for result in per_rank:
        references.update(result)
    return root, references


# ----------------------------------------------------------------- converted in-process
@pytest.fixture(scope="module")
def converted(checkpoints, megatron_world, tmp_path_factory):
    """Every checkpoint exported to HF (the vanilla TP=2 one through the CLI, sharded), and
    every export imported back at TP=2/PP=2."""
    from megatron_lm2.convert.cli import main
    from megatron_lm2.convert.from_hf import from_hf
    from megatron_lm2.convert.to_hf import to_hf

    root, _ = checkpoints
    out = tmp_path_factory.mktemp("converted")
    folders = {}
    for ckpt in sorted(p.name for p in root.iterdir()):
        hf = out / f"{ckpt}-hf"
        if ckpt == "vanilla-tp2":
            argv = ["to-hf", "--load", str(root / ckpt), "--save", str(hf), "--max-shard-size", "1MB",
                    "--tokenizer", "default"]
            assert main(argv) == 0
        else:
            to_hf(root / ckpt, hf, tokenizer="default")
        folders[ckpt] = hf
        from_hf(hf, out / f"{ckpt}-back", tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    return out, folders


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("ckpt", [f"{n}-tp2" for n in VARIANTS] + [f"{n}-pp2" for n in PP_VARIANTS])
def test_hf_logits_equal_megatron(checkpoints, converted, ckpt):
    _, references = checkpoints
    _, folders = converted
    model = _hf_model(folders[ckpt])
    expected_class = "LlamaForCausalLM" if ckpt.startswith("vanilla") else "LM2ForCausalLM"
    assert type(model).__name__ == expected_class
    reference, _ = references[ckpt]
    with torch.no_grad():
        logits = model(_tokens(), use_cache=False).logits
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= TOL
    if expected_class == "LM2ForCausalLM":
        # The comparison is sensitive to the memory: without its output the logits move.
        with torch.no_grad():
            for layer in model.model.layers:
                if layer.memory is not None:
                    layer.memory.o_proj.weight.zero_()
            ablated = model(_tokens(), use_cache=False).logits
        assert (ablated - reference).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("name", ["debug", "aligned", "token", "learned", "qknorm", "qknorm-token", "forget-bias",
                                  "identity-signs"])
def test_memory_banks_evolve_the_same_chunk_by_chunk(checkpoints, converted, name):
    _, references = checkpoints
    _, folders = converted
    model = _hf_model(folders[f"{name}-tp2"])
    _, expected = references[f"{name}-tp2"]
    tokens, chunk = _tokens(), model.config.memory_chunk_size
    assert len(expected) == SEQ // chunk
    with torch.no_grad():
        output = model(tokens[:, :chunk], use_cache=True)
        cache = output.past_key_values
        for k, banks in enumerate(expected):
            if k:
                model(tokens[:, k * chunk : (k + 1) * chunk], past_key_values=cache, use_cache=True)
            ours = cache.memory_banks()
            assert sorted(ours) == sorted(banks)
            for layer, bank in banks.items():
                assert (ours[layer] - bank).abs().max().item() <= TOL, (k, layer)
    # Banks really move from chunk to chunk.
    first, last = expected[0], expected[-1]
    assert any((first[n] - last[n]).abs().max() > 1e-2 for n in first)


@pytest.mark.parametrize("ckpt", [f"{n}-tp2" for n in VARIANTS] + [f"{n}-pp2" for n in PP_VARIANTS])
def test_round_trip_is_bit_identical(checkpoints, converted, ckpt):
    from megatron_lm2.convert.megatron_io import load_checkpoint

    root, _ = checkpoints
    out, _ = converted
    config, original = load_checkpoint(root / ckpt)
    config_back, back = load_checkpoint(out / f"{ckpt}-back")
    assert config_back.memory_layer_numbers == config.memory_layer_numbers
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    meta = json.loads((out / f"{ckpt}-back" / "lm2_config.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["pipeline_model_parallel_size"] == 2


def _loaded_at_tp2_logits(folder):
    from megatron_lm2.convert.megatron_config import read_config
    from megatron_lm2.model import attention_mask, build_model
    from megatron.core import dist_checkpointing

    config = read_config(folder).replace(tensor_model_parallel_size=2)
    model = build_model(config).eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), folder))
    with torch.no_grad():
        position = torch.arange(SEQ).expand(BATCH, -1)
        return _gather_tp(model(_tokens(), position, attention_mask(SEQ, config.attention_window)))


def test_imported_checkpoint_trains_at_tp2(checkpoints, converted):
    """from-hf output loads in a TP=2 Megatron job and computes the original logits."""
    _, references = checkpoints
    out, _ = converted
    logits = run_distributed(_loaded_at_tp2_logits, 2, str(out / "debug-tp2-back"), tp=2)[0]
    assert (logits - references["debug-tp2"][0]).abs().max().item() <= TOL


def test_export_folder_contents(converted):
    out, folders = converted
    lm2 = folders["debug-tp2"]
    config = json.loads((lm2 / "config.json").read_text())
    assert config["model_type"] == "lm2"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lm2.LM2ForCausalLM"
    for name in ("configuration_lm2.py", "modeling_lm2.py", "model.safetensors",
                 "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (lm2 / name).is_file(), name
    generation = json.loads((lm2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 3  # the embedded tokenizer's end of document

    llama = folders["vanilla-tp2"]
    config = json.loads((llama / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (llama / "modeling_lm2.py").exists()
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((llama / s).is_file() for s in shards)
    assert not list(out.glob(".*tmp*"))  # no temporary folders left behind

    from transformers import AutoTokenizer
    from megatron_lm2.tokenizer import load_tokenizer

    text = "Mary went to the kitchen. Where is Mary?"
    assert AutoTokenizer.from_pretrained(str(lm2), trust_remote_code=True).encode(text, add_special_tokens=False) == \
        load_tokenizer("default").encode(text)


def test_exported_code_imports_only_torch_and_transformers():
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    for name in ("configuration_lm2.py", "modeling_lm2.py"):
        tree = ast.parse((HF_CODE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # the sibling configuration file
                    assert node.module == "configuration_lm2", (name, node.module)
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, (name, roots)


def test_memory_subset_round_trip(megatron_world, tmp_path):
    """Memory in blocks 2 and 4 only, learned M_0, attention window: saved and converted in
    one process, HF logits against the same Megatron model."""
    from megatron.core import dist_checkpointing

    from megatron_lm2.convert.from_hf import from_hf
    from megatron_lm2.convert.megatron_config import write_config
    from megatron_lm2.convert.megatron_io import load_checkpoint
    from megatron_lm2.convert.to_hf import to_hf
    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.model import attention_mask, build_model

    config = get_flavor("debug", memory_layers=(2, 4), memory_init="learned", attention_window=128)
    torch.manual_seed(3)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".memory." in name:
                param.add_(0.2 * torch.randn_like(param))
        position = torch.arange(SEQ).expand(BATCH, -1)
        reference = model(_tokens(), position, attention_mask(SEQ, config.attention_window))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    write_config(config, ckpt / "lm2_config.json")
    _record(ckpt)
    to_hf(ckpt, tmp_path / "hf")
    hf = _hf_model(tmp_path / "hf")
    assert [layer.memory is not None for layer in hf.model.layers] == [False, True, False, True]
    with torch.no_grad():
        logits = hf(_tokens(), use_cache=False).logits
    assert (logits - reference).abs().max().item() <= TOL
    from_hf(tmp_path / "hf", tmp_path / "back")
    _, original = load_checkpoint(ckpt)
    _, back = load_checkpoint(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[n], t) for n, t in original.items())


def test_training_run_directory(megatron_world, tmp_path):
    """A `--save` directory of lm2-train: `latest` names iter_N, whose common state holds the
    run's TrainConfig (no lm2_config.json) next to the model under "model" and other state."""
    from megatron.core import dist_checkpointing

    from megatron_lm2.convert.megatron_io import load_checkpoint
    from megatron_lm2.model import build_model
    from megatron_lm2.training.config import TrainConfig

    run = TrainConfig(flavor="debug", memory_write="aligned", memory_slots=64)
    config = run.model_config()
    torch.manual_seed(5)
    model = build_model(config)
    step = tmp_path / "run" / "iter_0000010"
    step.mkdir(parents=True)
    state = {
        "model": model.sharded_state_dict(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in run.to_dict().items()},
        "train_state": {"step": 10, "consumed_samples": 80},
    }
    dist_checkpointing.save(state, str(step))
    _record(step)
    (tmp_path / "run" / "latest").write_text("iter_0000010\n")
    loaded_config, weights = load_checkpoint(tmp_path / "run")
    assert loaded_config.memory_write == "aligned" and loaded_config.memory_slots == 64
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert sorted(weights) == sorted(own)
    assert all(torch.equal(weights[k], v) for k, v in own.items())


# ------------------------------------------------------------------------------- errors
def test_clear_errors_for_bad_checkpoint_dirs(checkpoints, tmp_path):
    from megatron_lm2.convert.megatron_io import (
        CheckpointError,
        check_checkpoint_dir,
        checkpoint_config,
        read_metadata,
    )

    root, _ = checkpoints
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        check_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Megatron dist checkpoint"):
        check_checkpoint_dir(tmp_path / "empty")

    broken = tmp_path / "broken"
    shutil.copytree(root / "debug-tp2", broken)
    shard = sorted(broken.glob("*.distcp"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing .the checkpoint's integrity record"):
        check_checkpoint_dir(broken)
    # Without the record (allowed unverified), the metadata's own shard list still catches it.
    (broken / "lm2_integrity.json").unlink()
    with pytest.raises(CheckpointError, match="lm2_integrity.json: missing.*--allow-unverified-checkpoint"):
        check_checkpoint_dir(broken)
    with pytest.raises(CheckpointError, match=f"missing shard file.*{shard.name}"):
        check_checkpoint_dir(broken, allow_unverified=True)

    no_config = tmp_path / "no-config"
    shutil.copytree(root / "debug-tp2", no_config)
    (no_config / "lm2_config.json").unlink()
    with pytest.raises(CheckpointError, match="cannot tell which model"):
        checkpoint_config(no_config, read_metadata(no_config))

    interrupted = tmp_path / "interrupted"
    shutil.copytree(root / "debug-tp2", interrupted)
    (interrupted / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        check_checkpoint_dir(interrupted)


def test_wrong_config_names_the_missing_tensors(checkpoints, megatron_world, tmp_path):
    """A checkpoint whose config says 'memory' but whose weights have none."""
    from megatron_lm2.convert.megatron_io import CheckpointError, load_checkpoint

    root, _ = checkpoints
    wrong = tmp_path / "wrong"
    shutil.copytree(root / "vanilla-tp2", wrong)
    shutil.copyfile(root / "debug-tp2" / "lm2_config.json", wrong / "lm2_config.json")
    (wrong / "lm2_integrity.json").unlink()  # an edited config fails the checksums first
    with pytest.raises(CheckpointError, match="lacks .* tensor.*memory"):
        load_checkpoint(wrong, allow_unverified=True)


def test_tokenizer_larger_than_vocabulary_is_refused(checkpoints, tmp_path, capsys):
    from megatron_lm2.convert.cli import main

    root, _ = checkpoints
    small = tmp_path / "small"
    shutil.copytree(root / "debug-tp2", small)
    record = json.loads((small / "lm2_config.json").read_text())
    record["model"]["vocab_size"] = 1024
    (small / "lm2_config.json").write_text(json.dumps(record))
    (small / "lm2_integrity.json").unlink()  # an edited config fails the checksums first
    assert main(["to-hf", "--load", str(small), "--save", str(tmp_path / "hf"), "--tokenizer", "default",
                 "--allow-unverified-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert "2048 tokens" in err and "1024 rows" in err
    assert not (tmp_path / "hf").exists()


def test_hf_folder_with_missing_shard_or_pickle_weights(converted, tmp_path):
    from megatron_lm2.convert.from_hf import SafetensorsFolder
    from megatron_lm2.convert.megatron_io import CheckpointError

    _, folders = converted
    folder = tmp_path / "hf"
    shutil.copytree(folders["vanilla-tp2"], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file.*{shard.name}"):
        SafetensorsFolder(folder)
    for path in folder.glob("model*"):
        path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only safetensors"):
        SafetensorsFolder(folder)
