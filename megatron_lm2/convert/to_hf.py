"""Megatron dist checkpoint (any TP/PP) -> Hugging Face folder.

LM2 models export as model_type "lm2" with remote code (hf_lm2/ copied in, auto_map set);
a model without memory and without an attention window exports as a plain LlamaForCausalLM.
The folder is assembled in a temporary sibling directory and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, Tuple

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_lm2.convert.mapping import megatron_to_hf
from megatron_lm2.convert.megatron_config import is_plain_llama, to_hf_config
from megatron_lm2.convert.megatron_io import (
    CheckpointError,
    check_checkpoint_dir,
    checkpoint_config,
    load_checkpoint,
    read_metadata,
)

HF_CODE_DIR = Path(__file__).resolve().parent / "hf_lm2"
HF_CODE_FILES = ("configuration_lm2.py", "modeling_lm2.py")
AUTO_MAP = {
    "AutoConfig": "configuration_lm2.LM2Config",
    "AutoModel": "modeling_lm2.LM2Model",
    "AutoModelForCausalLM": "modeling_lm2.LM2ForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2048' -> bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def write_safetensors(
    tensors: Iterable[Tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int, total: int
) -> list[str]:
    """Write tensors into shards of at most max_shard_bytes (one tensor never splits), with
    model.safetensors.index.json when there is more than one shard."""
    shards: list[Dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in tqdm(tensors, total=total, desc="convert", unit="tensor"):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.contiguous()
        sizes[-1] += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in tqdm(list(zip(names, shards)), desc="write", unit="shard", disable=len(shards) == 1):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _set_dtype(hf_config, dtype: torch.dtype) -> None:
    name = str(dtype).replace("torch.", "")
    if hasattr(hf_config, "dtype") and not isinstance(getattr(type(hf_config), "dtype", None), property):
        try:
            hf_config.dtype = name
            return
        except Exception:  # noqa: BLE001 - older transformers
            pass
    hf_config.torch_dtype = name


def to_hf(
    load: str | os.PathLike,
    save: str | os.PathLike,
    tokenizer: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    allow_unverified: bool = False,
) -> Path:
    load, save = Path(load), Path(save)
    if save.exists() and any(save.iterdir()) and not overwrite:
        raise CheckpointError(f"{save} exists and is not empty (pass --overwrite to replace it)")
    path = check_checkpoint_dir(load, allow_unverified)
    config = checkpoint_config(path, read_metadata(path))
    tok = None
    if tokenizer is not None:
        from megatron_lm2.convert.tokenizer_files import check_tokenizer, token_ids

        tok = check_tokenizer(tokenizer, config.vocab_size)  # fail before the slow part
    config, state = load_checkpoint(path, allow_unverified)
    target = DTYPES[dtype] if dtype else next(iter(state.values())).dtype

    ids = {}
    if tok is not None:
        ids = token_ids(tok)
    hf_config = to_hf_config(config, **ids)
    plain = is_plain_llama(config)
    hf_config.architectures = ["LlamaForCausalLM" if plain else "LM2ForCausalLM"]
    if not plain:
        hf_config.auto_map = dict(AUTO_MAP)
    _set_dtype(hf_config, target)

    tmp = save.parent / f".{save.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        count = _count_hf_tensors(state, config)
        converted = ((n, t.to(target)) for n, t in megatron_to_hf(state, config))
        write_safetensors(converted, tmp, parse_size(max_shard_size), count)
        hf_config.save_pretrained(str(tmp))
        if not plain:
            for name in HF_CODE_FILES:
                shutil.copyfile(HF_CODE_DIR / name, tmp / name)
        from transformers import GenerationConfig

        generation = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
        generation.save_pretrained(str(tmp))
        if tok is not None:
            from megatron_lm2.convert.tokenizer_files import write_tokenizer_files

            write_tokenizer_files(tok, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save.exists():
        shutil.rmtree(save)
    os.replace(tmp, save)
    return save


def _count_hf_tensors(state, config) -> int:
    count = 0
    for name in state:
        if name.endswith("linear_qkv.weight"):
            count += 3
        elif name.endswith(("linear_fc1.weight", "linear_kv.weight")):
            count += 2
        elif not (name == "output_layer.weight" and config.tie_embeddings):
            count += 1
    return count
