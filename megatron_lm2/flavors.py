"""The flavor registry: one typed builder per model size, torchtitan-style.

    config = get_flavor("lm2-1.7b", tensor_model_parallel_size=2)

Every builder returns an LM2Config. `llama-*` flavors are the vanilla twins of `lm2-*`
(the same decoder, no memory). Parameter counts: megatron_lm2.accounting (and
`python -m megatron_lm2.flavors` prints the table, building each model on the meta device).
"""

from __future__ import annotations

import sys
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from megatron_lm2.cli_args import quiet_library_warnings
from megatron_lm2.cli_errors import cli_entry

quiet_library_warnings()  # before megatron-core loads (lm2-flavors imports this module first)
from megatron_lm2.config import ConfigError, LM2Config  # noqa: E402

FLAVORS: Dict[str, Callable[..., LM2Config]] = {}


def register(name: str):
    def wrap(builder: Callable[..., LM2Config]):
        FLAVORS[name] = builder
        return builder

    return wrap


def list_flavors() -> list[str]:
    return sorted(FLAVORS)


def get_flavor(name: str, **overrides) -> LM2Config:
    if name not in FLAVORS:
        raise ConfigError(f"unknown flavor {name!r}; known flavors: {', '.join(list_flavors())}")
    return FLAVORS[name](**overrides)


# Runtime fields every flavor starts from: what runs anywhere (fp32, weights built on the CPU,
# no fused kernels), so a model built directly (tests, conversion, evaluation) is the same on
# any machine. They are not part of a model's definition: the trainer replaces them for the
# hardware it runs on (megatron_lm2.training.build.runtime_settings: on GPUs device
# initialisation, fused kernels, gradient-accumulation fusion; bf16/FP8 from its flags).
RUNTIME_DEFAULTS = dict(
    params_dtype=torch.float32,
    pipeline_dtype=torch.float32,
    use_cpu_initialization=True,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
)


def llama_decoder(**fields) -> LM2Config:
    """Llama-3-style decoder: pre-RMSNorm, RoPE, SwiGLU, no biases, no dropout, with these model
    fields (the rest: LM2Config's defaults). Every flavor is one; a checkpoint's lm2_config.json
    names all its model fields and is rebuilt here (megatron_lm2.convert.megatron_config)."""
    architecture = dict(
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
    )
    return LM2Config(**{**RUNTIME_DEFAULTS, **architecture, **fields})


# The recipes' memory (issue 10, 2026-12-06 at 097fc56; docs/memory.md, "Decision (2026-12-06 at 097fc56)"): slot i takes
# token i of its chunk plus the token before it (N = C, so a value's slot holds its key), a cosine read
# whose keys start as its queries (the question's key finds that slot from step 0), and a forget gate
# that starts at 0.95. RECIPE_CHUNK is the largest chunk the study trained; one fact learns there as at C = 32.
# LM2Config's own defaults stay the paper's equations, so older checkpoint records keep their meaning.
RECIPE_CHUNK = 512


def recipe_memory(chunk: int = RECIPE_CHUNK) -> dict:
    """The memory knobs of the lm2-* recipes for a chunk of `chunk` tokens."""
    return dict(memory_chunk_size=chunk, memory_slots=chunk, memory_write="token", memory_scores="qknorm",
                memory_forget_bias=3.0, memory_write_shift=1, memory_qk_init="tied")


# The paper's memory (Kang et al. 2025, Sec. 3; issue 31): N = 2048 slots per memory block, the
# equations' gates (no forget bias), dot-product scores, independent key projection, the identity M_0.
# Its write is our "attention" write, the general form of Eq. 4-6 (slots attend over the chunk's tokens,
# docs/memory.md): the literal reading ("aligned", slot i <- token i) needs N = C, and N = C = 2048 is a
# chunk as long as the whole 2048-token training sequence, written after its last token, so the write
# would never receive a gradient. C = 1024 writes once inside every sequence, as the docs' flag set did.
PAPER_SLOTS, PAPER_CHUNK = 2048, 1024


def paper_memory() -> dict:
    """The memory knobs of the `*-paper` flavors: the paper's N = 2048 slots and equations."""
    return dict(memory_chunk_size=PAPER_CHUNK, memory_slots=PAPER_SLOTS, memory_write="attention",
                memory_scores="dot", memory_forget_bias=0.0, memory_write_shift=0,
                memory_qk_init="independent", memory_init="identity")


def memory_summary(cfg: LM2Config) -> str:
    """One column of `lm2-flavors`: which memory a flavor carries ('-' for none)."""
    if not cfg.memory_layer_numbers:
        return "-"
    extras = [cfg.memory_scores]
    if cfg.memory_forget_bias:
        extras.append(f"fb{cfg.memory_forget_bias:g}")
    if cfg.memory_write_shift:
        extras.append(f"sh{cfg.memory_write_shift}")
    if cfg.memory_qk_init != "independent":
        extras.append(cfg.memory_qk_init)
    return f"{cfg.memory_write} N{cfg.memory_slots} C{cfg.memory_chunk_size} " + ",".join(extras)


@register("debug")
def debug(**overrides) -> LM2Config:
    """Runs on a CPU in seconds. GQA (4 heads, 2 groups) so the tests cover it."""
    return llama_decoder(
        **{
            **dict(
                num_layers=4,
                hidden_size=128,
                ffn_hidden_size=384,
                num_attention_heads=4,
                num_query_groups=2,
                vocab_size=2048,
                seq_length=256,
                memory_slots=32,
                memory_heads=4,
                memory_chunk_size=64,
            ),
            **overrides,
        }
    )


@register("lm2-debug")
def lm2_debug(**overrides) -> LM2Config:
    """The debug decoder with the recipes' memory (N = C = 64): what the quickstart trains. `debug`
    keeps the paper's attention write as the tests' fixture for every write mode."""
    return debug(**{**recipe_memory(64), **overrides})


@register("debug-vanilla")
def debug_vanilla(**overrides) -> LM2Config:
    return debug(**{"memory_layers": (), **overrides})


def _lm2_1p7b(**overrides) -> LM2Config:
    # The paper's LM2-1.7B decoder: 16 blocks, d 2048, FFN 8192, 32 heads, 8 memory heads. Its memory
    # is the recipe's (above), not the paper's 2048 attention-written slots: a 2048-token training
    # sequence is four chunks of 512, so three writes train per sequence (docs/memory.md).
    return llama_decoder(
        **{
            **dict(
                num_layers=16,
                hidden_size=2048,
                ffn_hidden_size=8192,
                num_attention_heads=32,
                num_query_groups=32,
                vocab_size=49152,
                seq_length=2048,
                memory_heads=8,
                **recipe_memory(),
            ),
            **overrides,
        }
    )


@register("lm2-1.7b")
def lm2_1p7b(**overrides) -> LM2Config:
    return _lm2_1p7b(**overrides)


@register("lm2-1.7b-paper")
def lm2_1p7b_paper(**overrides) -> LM2Config:
    """The paper's LM2-1.7B as it describes it: its decoder and its memory (paper_memory above)."""
    return _lm2_1p7b(**{**paper_memory(), **overrides})


@register("llama-1.7b")
def llama_1p7b(**overrides) -> LM2Config:
    return _lm2_1p7b(**{"memory_layers": (), **overrides})


# The paper's Fig. 5 ablation: memory in the first 6 blocks, or in the first block only.
@register("lm2-1.7b-mem6")
def lm2_1p7b_mem6(**overrides) -> LM2Config:
    return _lm2_1p7b(**{"memory_layers": tuple(range(1, 7)), **overrides})


@register("lm2-1.7b-mem1")
def lm2_1p7b_mem1(**overrides) -> LM2Config:
    return _lm2_1p7b(**{"memory_layers": (1,), **overrides})


def _lm2_3b(**overrides) -> LM2Config:
    # Llama-3.2-3B's decoder shape with the SmolLM vocabulary; memory in every 2nd block keeps
    # memory parameters near the paper's ~30% of the total (all 28 blocks would add 1.85B).
    # 12 memory heads: head dim 256, the largest flash attention takes (8 heads would be 384);
    # so TP must divide 12 (1, 2, 3, 4, 6).
    return llama_decoder(
        **{
            **dict(
                num_layers=28,
                hidden_size=3072,
                ffn_hidden_size=8192,
                num_attention_heads=24,
                num_query_groups=8,
                vocab_size=49152,
                seq_length=4096,
                rotary_base=500000,
                memory_heads=12,
                memory_layers=tuple(range(2, 29, 2)),
                **recipe_memory(),
            ),
            **overrides,
        }
    )


@register("lm2-3b")
def lm2_3b(**overrides) -> LM2Config:
    return _lm2_3b(**overrides)


@register("lm2-3b-paper")
def lm2_3b_paper(**overrides) -> LM2Config:
    """lm2-3b's decoder with the paper's memory: the paper's memory at this size, for the ladder."""
    return _lm2_3b(**{**paper_memory(), **overrides})


@register("llama-3b")
def llama_3b(**overrides) -> LM2Config:
    return _lm2_3b(**{"memory_layers": (), **overrides})


def _lm2_8b(**overrides) -> LM2Config:
    # Llama-3-8B's decoder shape and vocabulary; memory in every 4th block (8 of 32).
    return llama_decoder(
        **{
            **dict(
                num_layers=32,
                hidden_size=4096,
                ffn_hidden_size=14336,
                num_attention_heads=32,
                num_query_groups=8,
                vocab_size=128256,
                seq_length=8192,
                rotary_base=500000,
                memory_heads=16,
                memory_layers=tuple(range(4, 33, 4)),
                **recipe_memory(),
            ),
            **overrides,
        }
    )


@register("lm2-8b")
def lm2_8b(**overrides) -> LM2Config:
    return _lm2_8b(**overrides)


@register("lm2-8b-paper")
def lm2_8b_paper(**overrides) -> LM2Config:
    """lm2-8b's decoder with the paper's memory."""
    return _lm2_8b(**{**paper_memory(), **overrides})


@register("llama-8b")
def llama_8b(**overrides) -> LM2Config:
    return _lm2_8b(**{"memory_layers": (), **overrides})


@cli_entry("lm2-flavors")
def main(argv=None) -> int:
    """`lm2-flavors`: the registry as a table (parameters from the config; training FLOPs per
    token as executed: GPU = TE's flash attention, CPU = the local spec; accounting.py). A
    bad flag ends with one line and exit code 2."""
    from megatron_lm2.accounting import flops_per_token, format_count, num_parameters
    from megatron_lm2.cli_args import ArgumentParser

    parser = ArgumentParser(prog="lm2-flavors", description="List the model flavors and their sizes.")
    parser.parse_args(argv)
    header = (f"{'flavor':<16}{'layers':>7}{'d':>6}{'mem layers':>11}  {'memory (write N C scores,knobs)':<34}"
              f"{'base':>9}{'memory':>9}{'total':>9}{'GFLOP/tok':>11}{'(CPU)':>8}")
    print(header)
    print("-" * len(header))
    for name in list_flavors():
        cfg = get_flavor(name)
        count = num_parameters(cfg)
        print(
            f"{name:<16}{cfg.num_layers:>7}{cfg.hidden_size:>6}{len(cfg.memory_layer_numbers):>11}"
            f"  {memory_summary(cfg):<34}"
            f"{format_count(count.base):>9}{format_count(count.memory):>9}"
            f"{format_count(count.total):>9}{flops_per_token(cfg) / 1e9:>11.2f}"
            f"{flops_per_token(cfg, kernel='local') / 1e9:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
