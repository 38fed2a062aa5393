"""Carry, reset, detach and inspect the memory banks of a model (or a list of pipeline model
chunks) between forward calls.

Training: every forward starts from M_0 (the default; unrelated sequences share nothing).
Streaming (long inputs, BABILong, generation): carry the banks from call to call.

    with carry_memory(model):          # banks persist across calls inside the block
        for segment in segments:
            logits = model(segment, ...)
            detach_memory(model)       # truncated backprop between calls, if training
    reset_memory(model)                # a new sequence starts from M_0

Banks are keyed by global layer number; each value is this rank's shard [B, N, d/tp].
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Optional, Union

import torch

from megatron_lm2.memory import LM2Memory

Models = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def memory_modules(model: Models) -> Dict[int, LM2Memory]:
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    found = {}
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, LM2Memory):
                found[module.layer_number] = module
    return dict(sorted(found.items()))


def set_carry(model: Models, enabled: bool) -> None:
    for module in memory_modules(model).values():
        module.carry = enabled
        if not enabled:
            module.bank = None
            module.pending_tokens = None


@contextlib.contextmanager
def carry_memory(model: Models, reset: bool = True) -> Iterator[None]:
    """Banks persist across forward calls inside the block; start from M_0 unless reset=False
    and banks were loaded with load_memory_banks."""
    if reset:
        reset_memory(model)
    set_carry(model, True)
    try:
        yield
    finally:
        set_carry(model, False)


def reset_memory(model: Models) -> None:
    """The next forward starts from M_0 (per-sequence reset)."""
    for module in memory_modules(model).values():
        module.bank = None
        module.pending_tokens = None


def detach_memory(model: Models) -> None:
    """Cut the autograd graph at the current banks (truncated backprop across calls)."""
    for module in memory_modules(model).values():
        if module.bank is not None:
            module.bank = module.bank.detach()
        if module.pending_tokens is not None:
            module.pending_tokens = module.pending_tokens.detach()


def memory_banks(model: Models) -> Dict[int, torch.Tensor]:
    """This rank's banks after the last carried forward: {layer_number: [B, N, d/tp]}.
    A bank holds every complete chunk so far; save and restore at chunk boundaries (a
    partial chunk's tokens are not part of it)."""
    return {n: m.bank for n, m in memory_modules(model).items() if m.bank is not None}


def load_memory_banks(model: Models, banks: Dict[int, torch.Tensor]) -> None:
    """Restore banks saved with memory_banks (same TP layout); enables carrying."""
    modules = memory_modules(model)
    missing = sorted(set(banks) - set(modules))
    if missing:
        raise KeyError(f"no memory layer with number(s) {missing} on this rank")
    for number, bank in banks.items():
        expected = (modules[number].num_slots, modules[number].local_hidden)
        if tuple(bank.shape[1:]) != expected:
            raise ValueError(
                f"layer {number}: bank shape {tuple(bank.shape)} does not match this rank's "
                f"[B, {expected[0]}, {expected[1]}]"
            )
        modules[number].bank = bank
        modules[number].pending_tokens = None
        modules[number].carry = True


def bank_shapes(model: Models, batch_size: int = 1) -> Dict[int, tuple]:
    """Per-rank bank shape of every memory layer on this rank: (B, N, d/tp)."""
    return {
        n: (batch_size, m.num_slots, m.local_hidden) for n, m in memory_modules(model).items()
    }


def set_gate_recording(model: Models, enabled: Optional[bool]) -> None:
    """True: every forward records gate means; False: none does; None (default): eval-mode
    forwards only. Training forwards that record nothing store nothing (graph-safe)."""
    for module in memory_modules(model).values():
        module.record_gates = enabled
        if enabled is False:
            module.gate_stats = {}


@contextlib.contextmanager
def record_gate_stats(model: Models) -> Iterator[None]:
    """The forwards inside the block record their gate means (the trainer wraps the steps it
    logs); gate_stats() reads them afterwards."""
    modules = memory_modules(model)
    previous = {n: m.record_gates for n, m in modules.items()}
    for module in modules.values():
        module.gate_stats = {}
        module.record_gates = True
    try:
        yield
    finally:
        for n, module in modules.items():
            module.record_gates = previous[n]


def gate_stats(model: Models) -> Dict[int, Dict[str, float]]:
    """Mean input / forget / output gate per memory layer over its last recorded forward
    (see record_gate_stats); {} for layers that recorded none."""
    return {
        n: {k: float(v) for k, v in m.gate_stats.items()}
        for n, m in memory_modules(model).items()
        if m.gate_stats
    }
