"""LM2TransformerLayer: Megatron-core's TransformerLayer with a memory branch after
self-attention (paper Fig. 1): h = h_attn + memory(norm(h_attn)), then the MLP as usual.

The memory is a submodule built from the spec (local or Transformer Engine), so the layer
itself holds no backend choice. Megatron's own forward runs unchanged around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)


@dataclass
class LM2TransformerLayerSubmodules(TransformerLayerSubmodules):
    memory_norm: Union[ModuleSpec, type] = IdentityOp
    memory: Union[ModuleSpec, type] = IdentityOp
    memory_bda: Union[ModuleSpec, type] = IdentityFuncOp


class LM2TransformerLayer(TransformerLayer):
    def __init__(self, config, submodules: LM2TransformerLayerSubmodules, layer_number=1, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.memory_norm = build_module(
            submodules.memory_norm,
            config=config,
            hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon,
        )
        self.memory = build_module(submodules.memory, config=config, layer_number=self.layer_number)
        self.memory_bda = build_module(submodules.memory_bda)

    def _forward_attention(self, hidden_states, *args, **kwargs):
        if kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None:
            # Megatron's KV-cached inference feeds one token per call; the memory would treat
            # each call as a new sequence. Stream with megatron_lm2.memory_state instead.
            raise NotImplementedError(
                "LM2 memory layers do not support Megatron's inference_context; carry the banks "
                "with megatron_lm2.memory_state.carry_memory (or use the HF export's generate())"
            )
        hidden_states, context = super()._forward_attention(hidden_states, *args, **kwargs)
        residual = hidden_states
        memory_output_with_bias = self.memory(self.memory_norm(hidden_states))
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.memory_bda(self.training, self.config.bias_dropout_fusion)(
                memory_output_with_bias, residual, self.hidden_dropout
            )
        return hidden_states, context
