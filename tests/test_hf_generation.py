"""generate() of the Hugging Face LM2 model (megatron_lm2/convert/hf_lm2): KV cache inside the
attention window, memory banks carried chunk to chunk, streaming prefill, bank reset / save /
restore. The reference is the same model run without a cache (full recompute), whose equality
with Megatron's forward tests/test_convert.py checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lm2.convert.hf_lm2.configuration_lm2 import LM2Config
from megatron_lm2.convert.hf_lm2.modeling_lm2 import _CACHE_FIELD, LM2Cache, LM2ForCausalLM, LM2Model

TOL = 1e-4
VOCAB = 512


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


def _model(window=32, write="attention", chunk=16, slots=16, prefill=None, memory_layers=None, scores="dot",
           init="identity", shift=0):
    torch.manual_seed(0)
    config = LM2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, memory_slots=slots, memory_heads=4,
        memory_chunk_size=chunk, memory_write=write, attention_window=window,
        prefill_piece_size=prefill, memory_layers=memory_layers, max_position_embeddings=4096,
        memory_scores=scores, memory_init=init, memory_write_shift=shift,
    )
    model = LM2ForCausalLM(config).eval()
    with torch.no_grad():  # memory weights large enough that the banks steer the logits
        for name, param in model.named_parameters():
            if ".memory." in name and param.dim() == 2:
                param.normal_(0.0, 0.3)
            elif name.endswith("_logit_scale"):  # qk-norm: a distinct scale per head
                param.uniform_(2.0, 12.0)
    return model


def _tokens(length, batch=2, seed=1):
    # Token 0 is the pad id passed to generate(): keep it out of prompts (it would read as padding).
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "window, write, slots, scores, init, shift",
    [(32, "attention", 16, "dot", "identity", 0), (None, "attention", 16, "dot", "identity", 0),
     (32, "aligned", 16, "dot", "identity", 0), (32, "token", 16, "dot", "identity", 0),
     (24, "attention", 8, "dot", "identity", 0), (32, "attention", 16, "qknorm", "identity", 0),
     (32, "token", 16, "qknorm", "identity", 0), (32, "attention", 80, "dot", "identity-signs", 0),
     (32, "token", 16, "qknorm", "identity", 1), (32, "attention", 16, "dot", "identity", 2)],
)
def test_greedy_with_cache_equals_full_recompute(window, write, slots, scores, init, shift):
    """45-token prompt (3 prefill pieces), 40 new tokens: decoding crosses memory chunk
    boundaries (every 16 tokens) and attention segment boundaries. identity-signs: N = 80 > d.
    shift: the write's tokens are summed with the ones before them, a chunk written token by token."""
    model = _model(window=window, write=write, slots=slots, scores=scores, init=init, shift=shift)
    prompt = _tokens(45)
    kwargs = dict(max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    cached = model.generate(prompt, **kwargs)
    recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert isinstance(_cache_of(cached), LM2Cache)
    assert torch.equal(cached.sequences, recomputed.sequences)
    steps = torch.stack(cached.logits, dim=1)
    assert (steps - torch.stack(recomputed.logits, dim=1)).abs().max().item() <= TOL
    # Each decoded token saw exactly what the full-sequence forward shows it.
    with torch.no_grad():
        full = model(cached.sequences, use_cache=False).logits
    assert (full[:, 44:-1] - steps).abs().max().item() <= TOL
    assert _cache_of(cached).seen_tokens == 45 + 39
    if window is not None:
        assert _cache_of(cached).key_cache[0].shape[2] <= window


def test_beam_search_with_cache_equals_full_recompute():
    model = _model()
    prompt = _tokens(30)
    kwargs = dict(max_new_tokens=20, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_banks_written_only_when_a_chunk_completes():
    model = _model()
    tokens = _tokens(40)
    with torch.no_grad():
        cache = _cache_of(model(tokens[:, :10], use_cache=True))
        start = cache.memory_banks()[1].clone()
        for t in range(10, 16):  # tokens 10..15 complete chunk 0
            model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
            if t < 15:
                assert torch.equal(cache.memory_banks()[1], start)
        assert not torch.equal(cache.memory_banks()[1], start)
        assert cache.memory[1].fill == 0
        model(tokens[:, 16:21], past_key_values=cache, use_cache=True)
        assert cache.memory[1].fill == 5


def test_streaming_prefill_consumes_long_prompts_in_pieces():
    """A 200-token prompt with a 32-token window: pieces of 16 tokens, a KV cache that never
    holds more than the window, and the same logits as one full forward."""
    model = _model(window=32, prefill=16)
    prompt = _tokens(200)
    pieces = []
    original = model.model._forward_piece

    def spy(x, cache):
        pieces.append(x.shape[1])
        kv = cache.key_cache.get(0)
        assert kv is None or kv.shape[2] <= 32
        return original(x, cache)

    model.model._forward_piece = spy
    with torch.no_grad():
        streamed = model(prompt, use_cache=True).logits
    assert pieces == [16] * 12 + [8]
    with torch.no_grad():
        full = model(prompt, use_cache=False).logits
    assert (streamed - full).abs().max().item() <= TOL
    # generate() keeps only the last position's logits during the prefill.
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    assert (out.logits[0] - full[:, -1]).abs().max().item() <= TOL


def test_reset_save_and_restore_banks(tmp_path):
    """Banks after sequence A, restored into a fresh stream, make the model continue as if A
    were still there (A spans whole attention segments, so only the memory carries it)."""
    model = _model(window=32, chunk=16)
    a, b = _tokens(64, seed=2), _tokens(48, seed=3)
    with torch.no_grad():
        joint = model(torch.cat((a, b), dim=1), use_cache=False).logits[:, 64:]
        model(a, use_cache=False)
        banks = model.memory_banks()
        assert sorted(banks) == [1, 2, 3] and banks[1].shape == (2, 16, 64)

        save_file({str(n): t for n, t in banks.items()}, str(tmp_path / "banks.safetensors"))
        model.reset_memory()
        fresh = model(b, use_cache=False).logits
        restored = {int(n): t for n, t in load_file(str(tmp_path / "banks.safetensors")).items()}
        model.load_memory_banks(restored)
        continued = model(b, use_cache=False).logits
        assert (continued - joint).abs().max().item() <= TOL
        assert (fresh - joint).abs().max().item() > 1e-2  # the memory carried A
        model.reset_memory()
        assert torch.equal(model(b, use_cache=False).logits, fresh)

    with pytest.raises(ValueError, match="does not match"):
        model.load_memory_banks({1: torch.zeros(2, 8, 64)})
    with pytest.raises(KeyError, match="no memory layer"):
        model.load_memory_banks({9: banks[1]})


# transformers >= 5.24 renamed generate()'s `past_key_values` to `cache` (the old name still
# works there, deprecated); a user may pass either, and the model must take both.
CACHE_KEYWORDS = ["past_key_values"] + (["cache"] if _CACHE_FIELD == "cache" else [])


def _cache_of(output):
    return getattr(output, _CACHE_FIELD)


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_generate_continues_a_cache_and_copies_branch(keyword):
    model = _model()
    prompt = _tokens(30)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    reference = model.generate(prompt, **kwargs)
    with torch.no_grad():
        cache = _cache_of(model(prompt[:, :25], use_cache=True))
    branch = cache.copy()
    continued = model.generate(prompt, **{keyword: cache}, **kwargs)
    assert torch.equal(continued, reference)
    assert branch.seen_tokens == 25  # the copy did not move with the stream
    again = model.generate(prompt, **{keyword: branch}, **kwargs)
    assert torch.equal(again, reference)


def test_generate_feeds_every_token_once(monkeypatch):
    """With a cache, generate() must feed each token through the model once: the prompt, then
    one token per step (the last new token is never fed). A release that hands the cache over
    under a name the model ignores makes every step recompute the whole sequence: still the
    same tokens, but quadratic work, which only this count shows."""
    model = _model()
    fed = []
    original = LM2Model._forward_piece

    def spy(self, x, cache):
        fed.append(x.shape[1])
        return original(self, x, cache)

    monkeypatch.setattr(LM2Model, "_forward_piece", spy)
    prompt = _tokens(30)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 30 + 12
    assert sum(fed) == 30 + 12 - 1
    assert fed[-11:] == [1] * 11


def test_memory_subset_and_padding_refused():
    model = _model(memory_layers=[2])
    assert [layer.memory is not None for layer in model.model.layers] == [False, True, False]
    assert sorted(_cache_of(model(_tokens(20), use_cache=True)).memory_banks()) == [2]
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded batches"):
        model.generate(_tokens(20), attention_mask=mask, max_new_tokens=2)


@pytest.mark.gpu
@pytest.mark.slow
def test_128k_prompt_fits_one_gpu():
    """lm2-1.7b's shape in bf16, 2048-token attention window, a 131072-token prompt: the
    streaming prefill keeps activations at one piece and the KV cache at one window."""
    config = LM2Config(
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=32, memory_slots=2048, memory_heads=8,
        memory_chunk_size=1024, attention_window=2048, max_position_embeddings=2048,
    )
    model = LM2ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    prompt = torch.randint(1, config.vocab_size, (1, 131072), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 131076)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak GPU memory for a 128K-token prompt: {peak_gib:.1f} GiB")
    assert peak_gib < 20
