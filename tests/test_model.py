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


@pytest.mark.parametrize("scores", ["dot", "qknorm"])
@pytest.mark.parametrize("write, shift", [("attention", 0), ("token", 0), ("aligned", 0), ("attention", 1),
                                          ("token", 2)])
def test_causal_across_chunks_float64(write, scores, shift):
    slots = {"attention": SMALL["memory_slots"]}.get(write, SMALL["memory_chunk_size"])
    cfg, model = _model(torch.float64, memory_write=write, memory_slots=slots, memory_scores=scores,
                        memory_write_shift=shift)
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


@pytest.mark.parametrize("name, overrides", [(n, {}) for n in list_flavors()] + [
    ("debug", dict(memory_scores="qknorm")),
    ("debug", dict(memory_scores="qknorm", memory_write="token", memory_slots=64, memory_init="learned"))])
def test_parameter_count_matches_the_built_model(name, overrides):
    cfg = get_flavor(name, perform_initialization=False, **overrides)
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


def test_every_flavor_has_memory_heads_flash_attention_takes():
    """The memory read runs torch's SDPA, whose flash kernel takes head dims up to 256: lm2-3b's
    8 memory heads of 384 could not use it (it has 12 of 256 now)."""
    for name in list_flavors():
        cfg = get_flavor(name)
        if cfg.memory_layer_numbers:
            assert cfg.memory_head_dim <= 256 and cfg.memory_head_dim % 8 == 0, (name, cfg.memory_head_dim)
    assert get_flavor("lm2-3b").memory_heads == get_flavor("lm2-3b-paper").memory_heads == 12


def test_every_flavor_keeps_its_slots_within_the_width():
    """The identity M_0 (the default) starts slots past d at zero, all alike: every registered
    flavor keeps N <= d, so its bank starts as the paper's identity and chunk 0 costs no GEMM.
    A config with N > d can ask for distinct start rows (identity-signs)."""
    from megatron_lm2.memory import identity_bank, initial_bank_rows

    for name in list_flavors():
        cfg = get_flavor(name)
        if cfg.memory_layer_numbers:
            assert cfg.memory_slots <= cfg.hidden_size and cfg.memory_initial_is_identity, name
    wide = get_flavor("debug", memory_slots=256)  # d = 128
    assert wide.memory_initial_is_identity and not get_flavor("debug", memory_slots=256,
                                                             memory_init="identity-signs").memory_initial_is_identity
    assert len({tuple(r.tolist()) for r in identity_bank(256, 128)}) == 129
    assert len({tuple(r.tolist()) for r in initial_bank_rows("identity-signs", 256, 128)}) == 256


def test_memory_linears_get_their_own_config():
    """Megatron's TE linear wrapper switches `tp_comm_overlap` off on the config it is given
    when the buffer name is not one of its own (megatron/core/extensions/transformer_engine.py,
    TELinear.__init__); the memory's "mem_*" linears must not do that to the config every later
    layer shares. The same mutation, on CPU, through a local linear that imitates it."""
    from dataclasses import replace as dc_replace

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.specs import get_lm2_layer_local_spec

    def te_like(base):
        class Linear(base):
            def __init__(self, *args, config, tp_comm_buffer_name=None, **kwargs):
                if config.tp_comm_overlap and tp_comm_buffer_name not in ("qkv", "proj", "fc1", "fc2"):
                    config.tp_comm_overlap = False
                super().__init__(*args, config=config, tp_comm_buffer_name=tp_comm_buffer_name, **kwargs)
        return Linear

    cfg = get_flavor("debug", **SMALL)
    cfg.tp_comm_overlap = True  # set after validation: Megatron refuses it without TE/SP
    spec = get_lm2_layer_local_spec(cfg)
    memory = spec.submodules.memory
    column, row = te_like(ColumnParallelLinear), te_like(RowParallelLinear)
    memory.submodules = dc_replace(
        memory.submodules, linear_q=column, linear_kv=column, linear_out_gate=column,
        linear_in_gate=column, linear_forget_gate=column, linear_gates=column, linear_proj=row)
    layer = build_module(spec, config=cfg, layer_number=1)
    assert cfg.tp_comm_overlap is True  # the shared config is untouched
    assert layer.memory.linear_q.config is not cfg and layer.memory.linear_q.config.tp_comm_overlap is False
    assert layer.memory.linear_proj.config is not cfg
    assert layer.self_attention.config is cfg and layer.mlp.config is cfg


def test_attention_window_is_refused_with_the_te_spec():
    from megatron_lm2.specs import get_lm2_block_spec

    cfg = get_flavor("debug", attention_window=64)
    with pytest.raises(ConfigError, match=r"attention_window=64 .*'local'"):
        get_lm2_block_spec(cfg, "te")


@pytest.mark.parametrize(
    "overrides, calls",
    [
        # The 1.7B layout, two chunks: every memory GEMM once per micro-batch.
        (dict(), dict(linear_q=1, linear_kv=1, linear_out_gate=1, linear_gates=1, linear_proj=1)),
        # Four chunks: bank j+1 needs chunk j's keys (through the write), so K/V and the gates
        # run once per written chunk; the aligned input gate reads tokens: one call.
        (dict(seq_length=96, memory_chunk_size=24),
         dict(linear_q=1, linear_kv=3, linear_out_gate=1, linear_gates=3, linear_proj=1)),
        (dict(seq_length=96, memory_chunk_size=24, memory_slots=24, memory_write="aligned"),
         dict(linear_q=1, linear_kv=3, linear_out_gate=1, linear_in_gate=1, linear_forget_gate=3,
              linear_proj=1)),
        # The token write's gates read only tokens: one call for every chunk's gates.
        (dict(seq_length=96, memory_chunk_size=24, memory_slots=24, memory_write="token"),
         dict(linear_q=1, linear_kv=3, linear_out_gate=1, linear_gates=1, linear_proj=1)),
        (dict(memory_init="learned"),
         dict(linear_q=1, linear_kv=2, linear_out_gate=1, linear_gates=1, linear_proj=1)),
    ],
    ids=["two-chunks", "four-chunks", "aligned", "token", "learned"],
)
def test_memory_linear_calls_per_micro_batch(overrides, calls):
    """TE's fused weight-gradient accumulation has been reported to lose part of a linear's
    gradient when it runs more than once per micro-batch (Megatron-LM PR #6965): the memory
    calls each linear once where the chunk recurrence allows it."""
    cfg, model = _model(**{"seq_length": 48, "memory_chunk_size": 24, **overrides})
    module = model.decoder.layers[0].memory
    counts = {}
    hooks = [getattr(module, name).register_forward_hook(
        lambda *_, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)) for name in calls]
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    model.train()
    _logits(model, tokens).float().sum().backward()
    for hook in hooks:
        hook.remove()
    assert counts == calls


def test_runtime_settings_follow_the_hardware():
    """Flavors carry CPU-safe runtime defaults; the trainer turns the GPU settings on."""
    from megatron_lm2.training.build import runtime_settings
    from megatron_lm2.training.config import parse_args

    train = parse_args(["--flavor", "debug", "--mock-data", "--bf16", "--fp8-format", "hybrid",
                        "--fp8-recipe", "tensorwise"], world_size=1)
    gpu = runtime_settings(train, "te", cuda=True, apex_wgrad=True, apex_softmax=True)
    assert gpu["model"] == dict(
        use_cpu_initialization=False, bias_activation_fusion=True, bias_dropout_fusion=True,
        masked_softmax_fusion=True, apply_rope_fusion=True, cross_entropy_loss_fusion=True,
        gradient_accumulation_fusion=True, fp8_recipe="tensorwise")
    assert gpu["ddp"] == dict(overlap_grad_reduce=True, overlap_param_gather=True)
    local_gpu = runtime_settings(train, "local", cuda=True, apex_wgrad=False)["model"]
    assert local_gpu["apply_rope_fusion"] is False and local_gpu["gradient_accumulation_fusion"] is False
    cpu = runtime_settings(parse_args(["--flavor", "debug", "--mock-data"], world_size=1), "local", cuda=False)
    assert cpu["ddp"] == dict(overlap_grad_reduce=False, overlap_param_gather=False)
    assert cpu["model"]["use_cpu_initialization"] is True and not any(
        v for k, v in cpu["model"].items() if k != "use_cpu_initialization")
    off = parse_args(["--flavor", "debug", "--mock-data", "--fused-kernels", "off",
                      "--overlap-grad-reduce", "off"], world_size=1)
    assert not runtime_settings(off, "te", cuda=True)["model"]["bias_activation_fusion"]
    with pytest.raises(ConfigError, match="--fused-kernels on"):
        runtime_settings(parse_args(["--flavor", "debug", "--mock-data", "--fused-kernels", "on"],
                                    world_size=1), "local", cuda=False)
    # Flavors themselves stay CPU-safe.
    cfg = get_flavor("lm2-8b")
    assert cfg.use_cpu_initialization and not cfg.gradient_accumulation_fusion and cfg.params_dtype == torch.float32


def test_tp_comm_overlap_is_refused_where_it_cannot_run(monkeypatch, capsys):
    """--tp-comm-overlap (TE userbuffers): one line naming the flag without sequence parallel
    (or TP 1), on a CPU, without TE layers, without CUDA_DEVICE_MAX_CONNECTIONS=1; on a GPU with
    TE it sets the model config's tp_comm_overlap."""
    from megatron_lm2.training.build import runtime_settings
    from megatron_lm2.training.config import parse_args

    base = ["--flavor", "debug", "--mock-data", "--tp-comm-overlap"]
    for extra, message in (([], "no --sequence-parallel"),
                           (["--sequence-parallel"], "--tensor-model-parallel-size 1"),
                           (["--tensor-model-parallel-size", "2"], "no --sequence-parallel")):
        with pytest.raises(SystemExit):
            parse_args(base + extra, world_size=2)
        err = capsys.readouterr().err
        assert err.startswith("lm2-train: error: --tp-comm-overlap needs --sequence-parallel") and message in err
        assert err.count("\n") == 1, err
    train = parse_args(base + ["--sequence-parallel", "--tensor-model-parallel-size", "2", "--bf16"],
                       world_size=2)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for backend, cuda, message in (("local", False, "--tp-comm-overlap needs a CUDA GPU"),
                                   ("te", False, "--tp-comm-overlap needs a CUDA GPU"),
                                   ("local", True, "--tp-comm-overlap needs Transformer Engine layers")):
        with pytest.raises(ConfigError) as error:
            runtime_settings(train, backend, cuda=cuda)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), error.value
    assert runtime_settings(train, "te", cuda=True)["model"]["tp_comm_overlap"] is True
    assert "tp_comm_overlap" not in runtime_settings(
        parse_args(["--flavor", "debug", "--mock-data"], world_size=1), "te", cuda=True)["model"]
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    with pytest.raises(ConfigError, match="^--tp-comm-overlap needs CUDA_DEVICE_MAX_CONNECTIONS=1 .*'8'"):
        runtime_settings(train, "te", cuda=True)


@pytest.mark.parametrize("backend", ["te", "local"])
def test_fusions_that_need_apex_stay_off_without_it(backend):
    """megatron-core imports Apex's softmax kernels and wgrad GEMM by bare name and ships
    neither: on a GPU without Apex the masked-softmax and gradient-accumulation fusions are off
    (with TE too: the output layer is megatron-core's own linear), with Apex they are on."""
    from megatron_lm2.training.build import runtime_settings
    from megatron_lm2.training.config import parse_args

    train = parse_args(["--flavor", "debug", "--mock-data", "--bf16"], world_size=1)
    bare = runtime_settings(train, backend, cuda=True, apex_wgrad=False, apex_softmax=False)["model"]
    assert bare["masked_softmax_fusion"] is False and bare["gradient_accumulation_fusion"] is False
    assert bare["bias_activation_fusion"] is True  # the other fusions stay on
    apex = runtime_settings(train, backend, cuda=True, apex_wgrad=True, apex_softmax=True)["model"]
    assert apex["masked_softmax_fusion"] is True and apex["gradient_accumulation_fusion"] is True


def test_apex_probes_follow_the_importable_modules(monkeypatch):
    """The trainer's probes: present only when every module megatron-core imports is found."""
    import importlib.util

    from megatron_lm2.training import build

    for present, expected in (({"scaled_masked_softmax_cuda"}, False),
                              (set(build.APEX_SOFTMAX) | {build.APEX_WGRAD}, True)):
        build._importable.cache_clear()
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, present=present: object() if name in present else None)
        monkeypatch.setattr("megatron.core.tensor_parallel.layers._grad_accum_fusion_available", expected)
        assert build.apex_softmax_available() is expected and build.apex_wgrad_available() is expected
    build._importable.cache_clear()


def test_gpu_runtime_settings_without_apex_build_and_run():
    """The settings a GPU without Apex gets (all but the device-only use_cpu_initialization),
    applied to the debug model on the CPU: it builds (megatron-core's ColumnParallelLinear
    refuses gradient_accumulation_fusion without Apex) and a bf16 forward runs (the masked
    softmax would import Apex's kernel for these shapes)."""
    from megatron_lm2.training.build import apply_runtime_settings, runtime_settings
    from megatron_lm2.training.config import parse_args

    train = parse_args(["--flavor", "debug", "--mock-data", "--bf16"], world_size=1)
    settings = runtime_settings(train, "te", cuda=True, apex_wgrad=False, apex_softmax=False)
    model_settings = {k: v for k, v in settings["model"].items() if k != "use_cpu_initialization"}
    # Fused RoPE (TE's) is refused without TE and dropped, as under --fused-kernels auto.
    cfg = get_flavor("debug", **{**SMALL, "bf16": True, "params_dtype": torch.bfloat16,
                                 "pipeline_dtype": torch.bfloat16})
    applied = apply_runtime_settings(cfg, dict(model=model_settings))
    assert applied["bias_activation_fusion"] and applied["bias_dropout_fusion"]
    assert not applied["apply_rope_fusion"]
    torch.manual_seed(0)
    model = build_model(cfg, backend="local").eval()
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_length))
    with torch.no_grad():
        logits = _logits(model, tokens)
    assert logits.shape == (4, cfg.seq_length, cfg.vocab_size) and torch.isfinite(logits.float()).all()


def test_refused_fusions_are_dropped_under_auto():
    """megatron-core refuses fused RoPE where its kernel is missing (here: no TE); auto drops
    it and keeps the rest, `--fused-kernels on` makes it an error."""
    from megatron_lm2.training.build import apply_runtime_settings

    settings = dict(model=dict(apply_rope_fusion=True, bias_activation_fusion=True))
    cfg = get_flavor("debug")
    try:
        cfg.replace(apply_rope_fusion=True)
        pytest.skip("this machine's megatron-core accepts fused RoPE")
    except (ValueError, AssertionError, ImportError):
        pass
    applied = apply_runtime_settings(cfg, settings)
    assert applied == dict(apply_rope_fusion=False, bias_activation_fusion=True)
    assert cfg.bias_activation_fusion is True and cfg.apply_rope_fusion is False
    with pytest.raises(ConfigError, match="apply_rope_fusion"):
        apply_runtime_settings(get_flavor("debug"), settings, strict=True)


# ----------------------------------------------------------------- the model's own mask
def _causal(length):
    return ~torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length)


@pytest.mark.parametrize("window", [None, 12, 24, 48])
@pytest.mark.parametrize("length", [48, 36, 30])  # full, shorter, shorter mid-chunk (eval)
def test_the_model_builds_its_attention_mask(window, length):
    """No mask passed: the logits of the caller-built mask (model.attention_mask, what the
    trainer and eval passed before), for the full sequence and shorter ones."""
    cfg, model = _model(torch.float64, attention_window=window)
    tokens = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        own = _logits(model, tokens)
        caller = _logits(model, tokens, attention_mask(length, window))
        causal = _logits(model, tokens, _causal(length))
    assert own.shape == (2, length, cfg.vocab_size)
    assert (own - caller).abs().max().item() < 1e-12
    windowed = window is not None and window < length
    # The window is really applied: whole-sequence causal attention gives other logits.
    assert ((own - causal).abs().max().item() > 1e-6) == windowed


def test_the_model_keeps_its_masks_per_length_and_device():
    cfg, model = _model(attention_window=12)
    first = model.attention_mask_for(48, "cpu")
    assert model.attention_mask_for(48, torch.device("cpu")) is first  # built once
    assert torch.equal(first, attention_mask(48, 12))
    assert model.attention_mask_for(30, "cpu").shape == (1, 1, 30, 30)
    assert model.attention_mask_for(12, "cpu") is None  # one window: Megatron's causal mask
    for length in range(13, 30):
        model.attention_mask_for(length, "cpu")
    assert len(model._masks) <= model._CACHED_MASKS  # eval's many lengths do not pile up
    model.transformer_backend = "te"  # the TE spec's attention would ignore the mask
    with pytest.raises(ValueError, match="attention_window=12.*'local'"):
        model.attention_mask_for(48, "cpu")


def test_paper_flavors_carry_the_papers_memory():
    """`lm2-1.7b-paper` is the paper's LM2-1.7B: its decoder (lm2-1.7b's) with N = 2048 slots per
    block, the equations' gates, dot scores, independent keys; and it is the flag set docs/training.md
    gives for the paper's memory, parsed by lm2-train (an independent statement of the same thing)."""
    from megatron_lm2.training.config import parse_args

    paper = get_flavor("lm2-1.7b-paper")
    flags = parse_args(["--flavor", "lm2-1.7b", "--mock-data", "--memory-write", "attention",
                        "--memory-scores", "dot", "--memory-forget-bias", "0", "--memory-write-shift", "0",
                        "--memory-qk-init", "independent", "--memory-slots", "2048",
                        "--memory-chunk-size", "1024"]).model_config()
    for field in ("memory_slots", "memory_chunk_size", "memory_write", "memory_scores", "memory_forget_bias",
                  "memory_write_shift", "memory_qk_init", "memory_init", "memory_layers", "num_layers",
                  "hidden_size", "ffn_hidden_size", "num_attention_heads", "memory_heads", "vocab_size"):
        assert getattr(paper, field) == getattr(flags, field), field
    assert (paper.memory_slots, paper.num_memory_chunks) == (2048, 2)  # the write trains once a sequence
    count = num_parameters(paper)
    assert abs(count.base - 1.2e9) / 1.2e9 < 0.08 and abs(count.memory - 0.5e9) / 0.5e9 < 0.08
    for size in ("3b", "8b"):  # the twins: the recipe's decoder, the paper's memory
        twin, recipe = get_flavor(f"lm2-{size}-paper"), get_flavor(f"lm2-{size}")
        assert (twin.memory_slots, twin.memory_write, twin.memory_forget_bias) == (2048, "attention", 0.0)
        assert (twin.num_layers, twin.hidden_size, twin.memory_layers) == (
            recipe.num_layers, recipe.hidden_size, recipe.memory_layers)


def test_lm2_flavors_prints_each_flavors_memory(capsys):
    from megatron_lm2.flavors import main

    assert main([]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(list_flavors())
    for name, line in rows.items():
        cfg = get_flavor(name)
        cells = line.split()
        if cfg.memory_layer_numbers:
            assert cells[4:7] == [cfg.memory_write, f"N{cfg.memory_slots}", f"C{cfg.memory_chunk_size}"], name
        else:
            assert cells[4] == "-", name


@pytest.mark.parametrize("name", ["lm2-1.7b", "lm2-1.7b-paper"])
def test_gpu_settings_build_the_1p7b_local_model_on_meta(name):
    """The 1.7B shape as a GPU without Apex or TE builds it (local spec, SDPA core attention,
    the fused kernels a GPU turns on, bf16), on the meta device: it constructs, with the
    parameter count of the accounting."""
    from megatron_lm2.accounting import num_parameters
    from megatron_lm2.attention import SDPADotProductAttention
    from megatron_lm2.training.build import apply_runtime_settings, runtime_settings
    from megatron_lm2.training.config import parse_args

    train = parse_args(["--flavor", name, "--mock-data", "--bf16"], world_size=1)
    settings = runtime_settings(train, "local", cuda=True, apex_wgrad=False, apex_softmax=False)
    model_settings = {k: v for k, v in settings["model"].items() if k != "use_cpu_initialization"}
    cfg = get_flavor(name, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    applied = apply_runtime_settings(cfg, dict(model=model_settings))
    assert not applied.get("masked_softmax_fusion") and not applied.get("gradient_accumulation_fusion")
    with torch.device("meta"):
        model = build_model(cfg, backend="local")
    assert sum(p.numel() for p in model.parameters()) == num_parameters(cfg).total
    assert sum(isinstance(m, SDPADotProductAttention) for m in model.modules()) == cfg.num_layers
