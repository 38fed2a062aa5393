"""Greedy decoding for the harness, over two backends.

HFGenerator:       a Hugging Face causal LM (an `lm2-convert to-hf` export, or any other),
                   through the standard `generate` API, greedy, `max_new_tokens` new tokens.
MegatronGenerator: a Megatron model (megatron_lm2.model.build_model). Inputs longer than the
                   attention window are consumed window by window through the memory:

    prompt = [ full window 1 | full window 2 | ... | partial window w ]
               carried banks: M_0 -> M_1 -> ... -> M_{w-1}

Each full window runs once with the banks carried (memory_state.carry_memory), so the bank
after it holds what the window wrote. The partial window, plus each generated token, is
re-run from the saved M_{w-1} (attention is recomputed inside the window: simple, exact,
and at most one window of work per new token). When it fills up it becomes a full window.
A model without memory (a vanilla twin) has nothing to carry: it reads the last `window`
tokens (a sliding window, the usual truncation), which is the most it can attend to.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.memory_state import carry_memory, load_memory_banks, memory_banks, memory_modules


class HFGenerator:
    """Greedy generation with a HF model and tokenizer (the model carries its own memory
    across its `generate` steps, if it has any).

    bos (see `resolve_bos`): None lets the tokenizer add what it adds by default (its BOS or
    other template tokens; the benchmark's runner does this, add_special_tokens=True); True puts
    the tokenizer's BOS id in front of the bare encoding; False encodes the bare text. Default:
    False for an LM2 export (trained on documents encoded by megatron_lm2.tokenizer, never any
    special token, so its prompts encode as the Megatron backend's do); None for any other model.
    `add_special_tokens` is the older spelling: True = bos None, False = bos False.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 20, add_special_tokens: Optional[bool] = None,
                 bos: "bool | None | str" = "auto"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        if bos == "auto":
            if add_special_tokens is None:
                add_special_tokens = getattr(model.config, "model_type", None) != "lm2"
            bos = None if add_special_tokens else False
        if bos is True and tokenizer.bos_token_id is None:
            raise UserInputError("--bos on: the tokenizer defines no BOS token")
        self.bos = bos
        self.add_special_tokens = bos is None

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
        return ([self.tokenizer.bos_token_id] if self.bos else []) + list(ids)

    @torch.no_grad()
    def __call__(self, prompt: str) -> str:
        input_ids = torch.tensor([self.encode(prompt)], device=self.model.device)
        attention_mask = torch.ones_like(input_ids)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
        )
        return self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return gather_from_tensor_model_parallel_region(logits)
    return logits


class MegatronGenerator:
    """Greedy decoding of a Megatron GPTModel (LM2 or vanilla) over inputs of any length.

    tokenizer: anything with encode(str) -> list[int] and decode(list[int]) -> str (the
    project's megatron_lm2.tokenizer); eod: stop id (None: always max_new_tokens).
    window: tokens per forward call; defaults to config.attention_window or seq_length.
    bos: put the tokenizer's BOS id in front of each prompt (default: no; megatron_lm2's
    pretraining data has none, documents are only separated by eod).
    """

    def __init__(self, model, tokenizer=None, window: Optional[int] = None, max_new_tokens: int = 20,
                 eod: Optional[int] = None, bos: bool = False):
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("MegatronGenerator runs one pipeline stage; load the checkpoint with PP=1")
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.window = int(window or config.attention_window or config.seq_length)
        if self.window < 1:
            raise UserInputError(f"--window {self.window}: must be at least 1")
        self.max_new_tokens = max_new_tokens
        self.eod = eod if eod is not None else getattr(tokenizer, "eod", None)
        self.bos = bos
        if bos and getattr(tokenizer, "bos", None) is None:
            raise UserInputError("--bos on: the tokenizer defines no BOS token")
        self.has_memory = bool(memory_modules(model))
        chunk = getattr(config, "memory_chunk_size", None)
        if self.has_memory and chunk and self.window % chunk:
            # Windows must end where memory chunks end, or a window's last partial chunk
            # would be written to the bank early (as if it were a whole chunk).
            raise UserInputError(f"--window {self.window}: not a multiple of "
                             f"memory_chunk_size={chunk}")

    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self._device())
        position_ids = torch.arange(tokens.shape[1], device=tokens.device)[None]
        logits = self.model(tokens, position_ids, None)
        return _gather_vocab(logits)[0, -1].float()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _restore(self, saved: dict) -> None:
        if saved:
            load_memory_banks(self.model, saved)
        else:
            _reset(self.model)

    def _consume(self, prompt_ids: list[int]) -> tuple[dict, list[int]]:
        """Run every full window but the last through the memory (inside carry_memory); at
        least one token stays in the current window, so there is something to predict from.
        Returns the banks after the full windows and the current window's tokens."""
        W = self.window
        n_full = (len(prompt_ids) - 1) // W
        for k in range(n_full):
            self._forward(prompt_ids[k * W:(k + 1) * W])
        return memory_banks(self.model), prompt_ids[n_full * W:]

    @torch.no_grad()
    def next_token_logits(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Logits [V] for the token after the prompt, with the prompt consumed window by window."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("empty prompt")
        was_training = self.model.training
        self.model.eval()
        try:
            if not self.has_memory:
                return self._forward(prompt_ids[-self.window:])
            with carry_memory(self.model):
                saved, current = self._consume(prompt_ids)
                self._restore(saved)
                return self._forward(current)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("empty prompt")
        was_training = self.model.training
        self.model.eval()
        W = self.window
        generated: list[int] = []
        try:
            if not self.has_memory:
                return self._generate_sliding(prompt_ids)
            with carry_memory(self.model):
                saved, current = self._consume(prompt_ids)
                for _ in range(self.max_new_tokens):
                    self._restore(saved)  # the current window always starts from the same banks
                    next_id = int(torch.argmax(self._forward(current)))
                    generated.append(next_id)
                    if self.eod is not None and next_id == self.eod:
                        break
                    current.append(next_id)
                    if len(current) > W:  # the window is full: commit it, carry on from its banks
                        self._restore(saved)
                        self._forward(current[:W])
                        saved = memory_banks(self.model)
                        current = current[W:]
        finally:
            self.model.train(was_training)
        return generated

    def _generate_sliding(self, ids: list[int]) -> list[int]:
        generated: list[int] = []
        for _ in range(self.max_new_tokens):
            next_id = int(torch.argmax(self._forward(ids[-self.window:])))
            generated.append(next_id)
            if self.eod is not None and next_id == self.eod:
                break
            ids.append(next_id)
        return generated

    def __call__(self, prompt: str) -> str:
        if self.tokenizer is None:
            raise ValueError("MegatronGenerator needs a tokenizer to decode text prompts")
        ids = self.generate_ids(([self.tokenizer.bos] if self.bos else []) + list(self.tokenizer.encode(prompt)))
        # Leave out the special tokens (the eod it stopped at, a bos or pad it emitted), as
        # HFGenerator's decode(skip_special_tokens=True) does.
        special = {self.eod, getattr(self.tokenizer, "bos", None), getattr(self.tokenizer, "pad", None)}
        return self.tokenizer.decode([i for i in ids if i not in special])


def _reset(model) -> None:
    from megatron_lm2.memory_state import reset_memory

    reset_memory(model)
