"""Whole-model properties of LM2 on Megatron-core (one process, TP=1, PP=1)."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lm2.accounting import num_parameters
from megatron_lm2.config import ConfigError, LM2Config
from megatron_lm2.flavors import get_flavor, list_flavors
from megatron_lm2.memory_state import bank_shapes, carry_memory, memory_banks, reset_memory
from megatron_lm2.model import attention_mask, build_model

pytestmark = pytest.mark.usefixtures("megatron_world")

SMALL = dict(num_layers=2, vocab_size=256, seq_length=48, memory_slots=16, memory_chunk_size=12)


def _model(dtype=torch.float32, **overrides):
    cfg = get_flavor("debug", **{**SMALL, "params_dtype": dtype, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # larger memory weights, so the memory's effect is far above rounding
        for name, p in model.named_parameters():
            if ".memory." in name:
                p.normal_(0.0, 0.2)
    return cfg, model.eval()


def _logits(model, tokens, mask=None):
    batch, seq = tokens.shape
    positions = torch.arange(seq).expand(batch, seq)
    return model(tokens, positions, mask)


def test_causal_across_chunks_float64():
    cfg, model = _model(torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    with torch.no_grad():
        base = _logits(model, tokens)
        # A chunk's first token, a mid-chunk token and the last chunk's middle (4 chunks of 12).
        for t in (12, 17, 30, 41):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
            out = _logits(model, changed)
            assert (out[:, :t] - base[:, :t]).abs().max() < 1e-12, f"position < {t} changed"
            assert (out[:, t] - base[:, t]).abs().max() > 1e-6


def _fact_then_query(model, cfg, fact, query, window_mask):
    """Two attention windows: the fact in window 0, the query in window 1."""
    tokens = torch.cat([fact, query], dim=1)
    return _logits(model, tokens, window_mask)[:, fact.shape[1] :]


@pytest.mark.parametrize("memory", [True, False])
def test_memory_carries_a_fact_past_the_attention_window(memory):
    overrides = dict(attention_window=24, memory_chunk_size=24)
    if not memory:
        overrides["memory_layers"] = ()
    cfg, model = _model(**overrides)
    mask = attention_mask(cfg.seq_length, cfg.attention_window)
    torch.manual_seed(1)
    query = torch.randint(0, cfg.vocab_size, (1, 24))
    fact_a = torch.randint(0, cfg.vocab_size, (1, 24))
    fact_b = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        a = _fact_then_query(model, cfg, fact_a, query, mask)
        b = _fact_then_query(model, cfg, fact_b, query, mask)
        # The same split as two streamed calls with the banks carried between them.
        with carry_memory(model):
            _logits(model, fact_a)
            streamed = _logits(model, query)
    effect = (a - b).abs().max().item()
    if memory:
        assert effect > 1e-3, "the fact in window 0 did not reach window 1 through memory"
        assert (streamed - a).abs().max() < 1e-5
    else:
        assert effect == 0.0, "without memory nothing may cross the attention window"


def test_memory_state_api():
    cfg, model = _model()
    tokens = torch.randint(0, cfg.vocab_size, (3, 24))
    with torch.no_grad():
        first = _logits(model, tokens)
        with carry_memory(model):
            _logits(model, tokens)
            banks = memory_banks(model)
            assert set(banks) == {1, 2}
            assert all(b.shape == (3, cfg.memory_slots, cfg.hidden_size) for b in banks.values())
            assert bank_shapes(model, 3) == {n: tuple(b.shape) for n, b in banks.items()}
            carried = _logits(model, tokens)
            reset_memory(model)
            fresh = _logits(model, tokens)
        after = _logits(model, tokens)
    assert (carried - first).abs().max() > 1e-4  # the carried bank changes the output
    assert torch.equal(fresh, first) and torch.equal(after, first)  # reset / leaving restores M_0


def _plain_gpt(cfg: LM2Config) -> GPTModel:
    base = TransformerConfig(
        **{
            k: getattr(cfg, k)
            for k in (
                "num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups "
                "normalization layernorm_epsilon gated_linear_unit activation_func add_bias_linear "
                "hidden_dropout attention_dropout init_method_std bias_activation_fusion "
                "bias_dropout_fusion masked_softmax_fusion apply_rope_fusion persist_layer_norm "
                "gradient_accumulation_fusion params_dtype use_cpu_initialization"
            ).split()
        }
    )
    return GPTModel(
        config=base,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
    ).eval()


@pytest.mark.parametrize("how", ["memory_layers=()", "memory output zeroed"])
def test_memory_off_equals_megatron_gptmodel(how):
    if how == "memory_layers=()":
        cfg, model = _model(memory_layers=())
    else:
        cfg, model = _model()
        with torch.no_grad():
            for layer in model.decoder.layers:
                layer.memory.linear_proj.weight.zero_()
    reference = _plain_gpt(cfg)
    state = {k: v for k, v in model.state_dict().items() if ".memory" not in k}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    with torch.no_grad():
        diff = (_logits(model, tokens) - _logits(reference, tokens)).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(memory_heads=3), ["memory_heads=3", "hidden_size=128"]),
        (dict(memory_heads=4, tensor_model_parallel_size=8, num_attention_heads=8, num_query_groups=8),
         ["memory_heads=4", "tensor_model_parallel_size=8"]),
        (dict(memory_slots=33, tensor_model_parallel_size=2), ["memory_slots=33", "tensor_model_parallel_size=2"]),
        (dict(memory_chunk_size=100), ["memory_chunk_size=100", "seq_length=256"]),
        (dict(memory_write="aligned"), ["memory_write='aligned'", "memory_slots=32", "memory_chunk_size=64"]),
        (dict(memory_write="random"), ["memory_write='random'"]),
        (dict(memory_init="zeros"), ["memory_init='zeros'"]),
        (dict(memory_layers=(0, 5)), ["memory_layers=[0, 5]", "num_layers=4"]),
        (dict(memory_bptt_chunks=1), ["memory_bptt_chunks=1"]),
        (dict(attention_window=100), ["attention_window=100", "seq_length=256"]),
    ],
)
def test_bad_configurations_name_the_knob(overrides, words):
    with pytest.raises(ConfigError) as err:
        get_flavor("debug", **overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_flavor_and_field():
    with pytest.raises(ConfigError, match="unknown flavor 'lm2-70b'.*debug"):
        get_flavor("lm2-70b")
    with pytest.raises(ConfigError, match="memory_slot"):
        get_flavor("debug").replace(memory_slot=3)


@pytest.mark.parametrize("name", list_flavors())
def test_parameter_count_matches_the_built_model(name):
    cfg = get_flavor(name, perform_initialization=False)
    with torch.device("meta"):
        model = build_model(cfg)
    built = sum(p.numel() for p in model.parameters())
    memory = sum(p.numel() for n, p in model.named_parameters() if ".memory" in n)
    count = num_parameters(cfg)
    assert (built, memory) == (count.total, count.memory)


def test_lm2_1p7b_is_near_the_paper():
    count = num_parameters(get_flavor("lm2-1.7b"))
    # Paper: ~1.2B base + ~0.5B memory. Ours: 1.28B (untied 49,152-token embeddings) + 0.47B.
    assert abs(count.base - 1.2e9) / 1.2e9 < 0.08
    assert abs(count.memory - 0.5e9) / 0.5e9 < 0.08
