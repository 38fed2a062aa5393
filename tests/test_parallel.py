"""Tensor and pipeline parallelism: TP=2, PP=2 and TP=2 x PP=2 train exactly like TP=1 x PP=1
(losses and gradients over a few optimizer steps through Megatron's DDP, optimizer and
pipeline schedules), and every rank holds its share of every memory bank."""

import pytest
import torch

from megatron_lm2.testing import run_distributed

SMALL = dict(num_layers=4, vocab_size=256, seq_length=32, memory_slots=16, memory_chunk_size=8)
STEPS, MICRO_BATCHES, MICRO_BATCH = 3, 2, 2


def _train(checkpoint_dir, save, steps=STEPS, overrides=None):
    """Runs in every rank. The reference (save=True) writes its initial weights with
    dist_checkpointing; every other layout loads them resharded, so all start equal (Megatron
    draws initial weights in build order, which differs per pipeline stage). Returns losses
    (last stage), per-parameter squared gradient norms and memory gradients of this rank's
    shard, and bank shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.memory_state import carry_memory, memory_banks, memory_modules
    from megatron_lm2.model import build_model

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cfg = get_flavor(
        "debug", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **{**SMALL, **(overrides or {})}
    )
    model = build_model(cfg)
    if save:
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint_dir))
    ddp = DistributedDataParallel(
        config=cfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        # SGD with momentum: Adam divides each gradient entry by its own magnitude, which
        # turns fp32 summation-order noise in near-zero entries into O(lr) parameter changes
        # that compound; the layouts would then agree only to ~1e-4. (The trainer's tests
        # cover Adam on losses.)
        OptimizerConfig(optimizer="sgd", lr=0.5, sgd_momentum=0.9, clip_grad=1.0, bf16=False),
        [ddp],
    )
    generator = torch.Generator().manual_seed(7)
    data = torch.randint(
        0, cfg.vocab_size, (steps, MICRO_BATCHES, MICRO_BATCH, cfg.seq_length + 1),
        generator=generator,
    )
    positions = torch.arange(cfg.seq_length).expand(MICRO_BATCH, -1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch[:, :-1], positions, None, labels=batch[:, 1:])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    def global_name(name):
        # decoder.layers.<local i>.x -> layer<global number>.x, so stages can be compared.
        if name.startswith("module.decoder.layers."):
            local, rest = name[len("module.decoder.layers."):].split(".", 1)
            return f"layer{model.decoder.layers[int(local)].layer_number}.{rest}"
        return name.removeprefix("module.")

    losses, grad_sq, memory_grads = [], [], []
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(list(data[step])),
            model=[ddp],
            num_microbatches=MICRO_BATCHES,
            seq_length=cfg.seq_length,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        if reduced:
            losses.append(torch.stack([r["loss"] for r in reduced]).mean().item())
        grad_sq.append(
            {
                global_name(n): (p.main_grad.double() ** 2).sum().item()
                for n, p in ddp.named_parameters()
            }
        )
        memory_grads.append(
            {
                global_name(n): (p.main_grad.clone(), getattr(p, "partition_dim", -1))
                for n, p in ddp.named_parameters()
                if ".memory." in n
            }
        )
        update_ok, _, _ = optimizer.step()
        assert update_ok

    # Each rank's banks: run its memory modules on their own (stage-local) inputs.
    with torch.no_grad(), carry_memory(model):
        for module in memory_modules(model).values():
            module(torch.randn(cfg.seq_length, 3, cfg.hidden_size))
        banks = {n: tuple(b.shape) for n, b in memory_banks(model).items()}
    return dict(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        losses=losses,
        grad_sq=grad_sq,
        memory_grads=memory_grads,
        banks=banks,
        sharded={global_name(n): bool(getattr(p, "tensor_model_parallel", False))
                 for n, p in ddp.named_parameters()},
    )


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    return str(tmp_path_factory.mktemp("initial_weights"))


@pytest.fixture(scope="module")
def reference(initial_weights):
    (result,) = run_distributed(_train, 1, initial_weights, True)
    return result


def _full(name, parts):
    """The TP=1 tensor from each TP rank's shard {rank: (grad, partition_dim)}."""
    shards = [parts[k][0] for k in sorted(parts)]
    dim = parts[0][1]
    if dim < 0:
        return shards[0]
    if name.endswith("linear_gates.weight"):  # per rank [in rows; forget rows] (memory.py)
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _combine(results):
    """Reassemble per-parameter gradient norms and full memory gradients from all ranks."""
    losses = next(r["losses"] for r in results if r["losses"])
    grad_norms = []
    memory = []
    for step in range(STEPS):
        sq, parts = {}, {}
        for r in results:
            for name, value in r["grad_sq"][step].items():
                if r["sharded"][name]:
                    sq[name] = sq.get(name, 0.0) + value
                elif r["tp_rank"] == 0:
                    sq[name] = value
            for name, (grad, dim) in r["memory_grads"][step].items():
                parts.setdefault(name, {})[r["tp_rank"]] = (grad, dim)
        grad_norms.append({n: v**0.5 for n, v in sq.items()})
        memory.append({n: _full(n, p) for n, p in parts.items()})
    return losses, grad_norms, memory


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_equals_single_process(reference, initial_weights, tp, pp):
    results = run_distributed(_train, tp * pp, initial_weights, False, tp=tp, pp=pp)
    _assert_same_training(results, reference, tp, pp)


def test_qknorm_memory_parallel_equals_single_process(tmp_path):
    """qk-norm scores (learned per-head scales for the read and the write, sharded with the
    heads), a forget-gate bias (added to each rank's forget columns of the fused gate GEMM) and a
    write shift (on the replicated tokens, before the write's columns are scattered) train the
    same at TP = 2 x PP = 2 as in one process."""
    qknorm = dict(memory_scores="qknorm", memory_logit_scale=4.0, memory_forget_bias=2.0, memory_write_shift=1)
    (reference,) = run_distributed(_train, 1, str(tmp_path), True, STEPS, qknorm)
    results = run_distributed(_train, 4, str(tmp_path), False, STEPS, qknorm, tp=2, pp=2)
    _assert_same_training(results, reference, 2, 2)
    _, _, ref_memory = _combine([reference])
    scales = [n for n in ref_memory[0] if n.endswith("_logit_scale")]
    assert len(scales) == 2 * SMALL["num_layers"], scales  # read and write, every layer


def _assert_same_training(results, reference, tp, pp):
    ref_losses, ref_norms, ref_memory = _combine([reference])
    losses, norms, memory = _combine(results)

    assert len(losses) == STEPS
    for ours, ref in zip(losses, ref_losses):
        assert abs(ours - ref) / abs(ref) <= 1e-5, (losses, ref_losses)
    for step in range(STEPS):
        assert set(norms[step]) == set(ref_norms[step])
        for name, ref in ref_norms[step].items():
            assert abs(norms[step][name] - ref) <= 1e-5 * max(ref, 1e-6), (step, name)
        for name, ref in ref_memory[step].items():
            got = memory[step][name]
            assert got.shape == ref.shape, name
            # Relative error in norm: summation order differs across TP layouts (fp32).
            assert ((got - ref).norm() / ref.norm()).item() <= 1e-5, (step, name)
    # The memory gradients are real (the write path trains: 4 chunks per sequence).
    assert all(ref.abs().max() > 0 for ref in ref_memory[0].values())

    # Banks: each TP rank holds d/tp columns of every bank; each stage holds its layers' banks.
    hidden, slots, layers = 128, SMALL["memory_slots"], SMALL["num_layers"]
    for r in results:
        per_stage = layers // pp
        expected = set(range(r["pp_rank"] * per_stage + 1, (r["pp_rank"] + 1) * per_stage + 1))
        assert set(r["banks"]) == expected
        assert all(shape == (3, slots, hidden // tp) for shape in r["banks"].values())


def _memory_branch(sequence_parallel, write="attention", scores="dot"):
    """One memory module (TP = world size) with write mode `write` on fixed inputs: its output
    and gradients, with the tokens split along the sequence when sequence_parallel."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cfg = get_flavor(
        "debug", tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        hidden_size=64, num_attention_heads=4, memory_slots=8, memory_chunk_size=8, seq_length=32,
        memory_write=write, memory_scores=scores,
    )
    torch.manual_seed(0)
    module = build_module(get_memory_local_spec(), config=cfg, layer_number=1)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(32, 2, 64, generator=generator)
    weight = torch.randn(32, 2, 64, generator=generator)
    if sequence_parallel:
        rows = slice(rank * 32 // tp, (rank + 1) * 32 // tp)
        tokens, weight = tokens[rows], weight[rows]
    tokens.requires_grad_(True)
    output, _ = module(tokens)
    (output * weight).sum().backward()
    return dict(
        rank=rank,
        output=output.detach(),
        token_grad=tokens.grad,
        grads={n: (p.grad, getattr(p, "partition_dim", -1)) for n, p in module.named_parameters()},
    )


@pytest.mark.parametrize("write, scores", [("attention", "dot"), ("token", "dot"), ("attention", "qknorm"),
                                           ("token", "qknorm")])
def test_memory_sequence_parallel_equals_tp1(write, scores):
    (ref,) = run_distributed(_memory_branch, 1, False, write, scores)
    results = run_distributed(_memory_branch, 2, True, write, scores, tp=2)
    output = torch.cat([r["output"] for r in results])  # sequence-split outputs
    token_grad = torch.cat([r["token_grad"] for r in results])
    assert output.shape == ref["output"].shape
    assert ((output - ref["output"]).norm() / ref["output"].norm()) < 1e-6
    assert ((token_grad - ref["token_grad"]).norm() / ref["token_grad"].norm()) < 1e-6
    for name, (grad, dim) in ref["grads"].items():
        full = _full(name, {r["rank"]: r["grads"][name] for r in results})
        # A logit scale's gradient sums B x c x N score terms that largely cancel: fp32 order
        # noise is ~1e-6 of it (1.5e-6 seen), so it gets the training tests' 1e-5.
        bound = 1e-5 if name.endswith("_logit_scale") else 1e-6
        assert ((full - grad).norm() / grad.norm()) < bound, name


def _tied_memory_weights():
    """One memory layer built at TP = world size with memory_qk_init="tied" (CPU initialisation, as
    the flavors build): this rank's W_Q and W_KV rows."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec

    cfg = get_flavor("debug", tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                     memory_qk_init="tied", **SMALL)
    torch.manual_seed(0)
    module = build_module(get_memory_local_spec(), config=cfg, layer_number=1)
    return dict(q=module.linear_q.weight.detach().clone(), kv=module.linear_kv.weight.detach().clone(),
                heads=module.num_heads, head_dim=module.head_dim)


def test_tied_qk_init_is_the_same_at_any_tensor_parallel_size():
    """Each rank ties its own heads' keys to their queries; together the shards are TP = 1's weights."""
    (ref,) = run_distributed(_tied_memory_weights, 1)
    shards = run_distributed(_tied_memory_weights, 2, tp=2)
    for r in shards:
        kv = r["kv"].view(r["heads"], 2, r["head_dim"], -1)
        assert torch.equal(kv[:, 0], r["q"].view(r["heads"], r["head_dim"], -1))
    assert torch.equal(torch.cat([r["q"] for r in shards]), ref["q"])
    assert torch.equal(torch.cat([r["kv"] for r in shards]), ref["kv"])


def _save_and_reload(checkpoint_dir, save):
    """Memory in a subset of layers (2 of 4) round-trips through dist_checkpointing at TP=2."""
    from megatron.core import dist_checkpointing, parallel_state as ps

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.model import build_model

    tp = ps.get_tensor_model_parallel_world_size()
    cfg = get_flavor("debug", memory_layers=(2, 3), tensor_model_parallel_size=tp, **{
        k: v for k, v in SMALL.items() if k != "num_layers"})
    torch.manual_seed(0 if save else 1)  # the loading model starts from different weights
    model = build_model(cfg)
    if save:
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint_dir))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_memory_subset_checkpoint_reshards(tmp_path):
    saved = run_distributed(_save_and_reload, 2, str(tmp_path), True, tp=2)
    loaded = run_distributed(_save_and_reload, 2, str(tmp_path), False, tp=2)
    assert any(".memory." in n for n in saved[0]) and "decoder.layers.0.memory_norm.weight" not in saved[0]
    for rank in range(2):
        for name, value in saved[rank].items():
            assert torch.equal(loaded[rank][name], value), name
