"""Hugging Face folder (LM2 or Llama, safetensors) -> Megatron dist checkpoint for continued
pretraining at any TP/PP.

The folder's own Python files are never run: its config.json is read with this package's
LM2Config (or transformers' LlamaConfig) and its weights with safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_lm2.convert.mapping import hf_to_megatron
from megatron_lm2.convert.megatron_config import from_hf_config
from megatron_lm2.convert.megatron_io import CheckpointError, save_checkpoint
from megatron_lm2.model import padded_vocab_size


def read_hf_config(folder: Path):
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    model_type = raw.get("model_type")
    if model_type == "lm2":
        from megatron_lm2.convert.hf_lm2.configuration_lm2 import LM2Config

        return LM2Config.from_pretrained(str(folder))
    if model_type == "llama":
        from transformers import LlamaConfig

        return LlamaConfig.from_pretrained(str(folder))
    raise CheckpointError(f"{path}: model_type={model_type!r}; only 'lm2' and 'llama' convert")


class SafetensorsFolder:
    """Lazy reader over model.safetensors or a sharded index; errors name the missing file."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = f" (found {', '.join(others)}: only safetensors weights are read)" if others else ""
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{folder}: missing shard file(s) {', '.join(missing)}")
        self.weight_map = weight_map
        self._open = {}

    def names(self):
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), framework="pt")
        return self._open[file].get_tensor(name)

    def shape(self, name: str) -> tuple:
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), framework="pt")
        return tuple(self._open[file].get_slice(name).get_shape())


EMBED_TOKENS = "model.embed_tokens.weight"


def check_shapes(folder: Path, hf_config, weights: SafetensorsFolder) -> None:
    """config.json against the weights, before any conversion: a wrong hidden_size or
    vocab_size is named as such instead of failing in a reshape."""
    if EMBED_TOKENS not in weights.weight_map:
        raise CheckpointError(f"{folder}: the weights hold no {EMBED_TOKENS}")
    want = (hf_config.vocab_size, hf_config.hidden_size)
    got = weights.shape(EMBED_TOKENS)
    if got != want:
        raise CheckpointError(
            f"{folder / 'config.json'}: vocab_size={want[0]}, hidden_size={want[1]} do not match the "
            f"weights ({EMBED_TOKENS} is {list(got)})")


def from_hf(
    load: str | os.PathLike,
    save: str | os.PathLike,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> Path:
    folder = Path(load)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such Hugging Face folder")
    hf_config = read_hf_config(folder)
    weights = SafetensorsFolder(folder)
    check_shapes(folder, hf_config, weights)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    vocab = padded_vocab_size(hf_config.vocab_size, tp, make_vocab_size_divisible_by)
    config = from_hf_config(hf_config, vocab_size=vocab)
    if config.num_layers % pp:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} does not divide num_layers={config.num_layers}"
        )
    # Validates the TP split (attention heads, query groups, memory heads and slots).
    config.replace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)

    # Megatron keeps fp32 master weights (params_dtype of the flavors); bf16 tensors upcast exactly.
    try:
        state = hf_to_megatron(lambda n: weights.get(n).float(), weights.names(), config)
    except RuntimeError as exc:  # a view/reshape of a tensor whose shape the config does not fit
        raise CheckpointError(
            f"{folder}: the weights do not fit config.json ({exc}); check num_attention_heads, "
            f"num_key_value_heads, intermediate_size and the memory fields") from None
    if vocab != hf_config.vocab_size:  # pad rows Megatron needs for the TP split; never used
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in state:
                rows = state[name]
                pad = rows.new_zeros(vocab - rows.shape[0], rows.shape[1])
                state[name] = torch.cat((rows, pad), dim=0)
    return save_checkpoint(state, config, save, tp, pp, overwrite=overwrite)
