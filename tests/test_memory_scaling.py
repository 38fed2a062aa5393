"""The memory-scaling study tool (benchmarks/memory_scaling.py) and its tasks
(megatron_lm2.eval.memory_tasks): the study's forward equals the module and the float64
reference, the tasks put their answers where they claim, and a seconds-long run resumes."""

import json
import os
import sys

import pytest
import torch

from megatron_lm2.eval import babilong_gen
from megatron_lm2.eval.memory_tasks import TaskSpec, make_batch, twohop_story, with_other_keys, without_facts
from megatron_lm2.model import attention_mask
from reference import memory_reference, weights_of

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import memory_scaling as ms  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world", "one_thread")


def _cfg(**kw):
    base = dict(task="fact", chunk=8, slots=6, pairs=1, hops=1, model="lm2", write="attention",
                tau_read=3.0, tau_write=5.0)
    return {**base, **kw}


def _memory_of(model):
    return ms.memory_modules(model)[0]


@pytest.mark.parametrize("write", ["attention", "qknorm", "salience", "qknorm-salience", "token", "qknorm-token"])
def test_study_forward_equals_float64_reference(write):
    token = write.endswith("token")
    model, _ = ms.build(_cfg(write=write, slots=8 if token else 6), 0)
    model.double()
    mem = _memory_of(model)
    with torch.no_grad():
        for p in mem.parameters():
            p.normal_(0.0, 0.3)
    tokens = torch.randn(24, 2, 128, dtype=torch.float64)  # 3 chunks of 8
    out, _ = mem(tokens)
    ref, _ = memory_reference(tokens, weights_of(mem, mem.num_heads), mem.num_heads, 8,
                              "token" if token else "attention", qk_norm=write.startswith("qknorm"))
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-10
    assert ref.abs().max() > 1e-2


@pytest.mark.parametrize("write", ["aligned", "qknorm-aligned"])
def test_study_aligned_write_equals_float64_reference(write):
    """--write aligned is the paper's equations literally (the reference's "aligned"): the module's
    own write, N = C, dot scores (qknorm-aligned: the cosine read at --tau-read)."""
    qk = write.startswith("qknorm")
    model, _ = ms.build(_cfg(write=write, slots=8, forget_bias=1.5), 0)
    mem = _memory_of(model)
    assert (mem.config.memory_write, mem.config.memory_scores) == ("aligned", "qknorm" if qk else "dot")
    assert ms.logit_scales(write, ms.parse_args(["--write", write]))["tau_write"] is None
    model.double()
    with torch.no_grad():
        for p in mem.parameters():
            p.normal_(0.0, 0.3)
    tokens = torch.randn(24, 2, 128, dtype=torch.float64)
    out, _ = mem(tokens)
    ref, _ = memory_reference(tokens, weights_of(mem, mem.num_heads), mem.num_heads, 8, "aligned",
                              qk_norm=qk, forget_bias=1.5)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-10
    token, _ = memory_reference(tokens, weights_of(mem, mem.num_heads), mem.num_heads, 8, "token",
                                qk_norm=qk, forget_bias=1.5)
    assert ((out - token).abs().max() / ref.abs().max()).item() > 1e-3  # not the token write


@pytest.mark.parametrize("write", ["attention", "qknorm-token"])
def test_study_shift_equals_float64_reference(write):
    """--shift 1: the write takes e_t + e_(t-1) within the chunk (the reference's `shift`)."""
    token = write.endswith("token")
    model, _ = ms.build(_cfg(write=write, slots=8 if token else 6, shift=1), 0)
    model.double()
    mem = _memory_of(model)
    with torch.no_grad():
        for p in mem.parameters():
            p.normal_(0.0, 0.3)
    tokens = torch.randn(24, 2, 128, dtype=torch.float64)
    out, _ = mem(tokens)
    args = (tokens, weights_of(mem, mem.num_heads), mem.num_heads, 8, "token" if token else "attention")
    qk = write.startswith("qknorm")
    ref, _ = memory_reference(*args, qk_norm=qk, shift=1)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-10
    plain, _ = memory_reference(*args, qk_norm=qk)
    assert ((out - plain).abs().max() / ref.abs().max()).item() > 1e-3


@pytest.mark.parametrize("write, forget_bias, shift", [
    ("attention", 0.0, 0), ("token", 0.0, 0), ("qknorm", 0.0, 0), ("qknorm-token", 0.0, 0), ("attention", 2.5, 0),
    ("qknorm-token", 2.5, 0), ("qknorm-token", 2.5, 1), ("attention", 0.0, 2)])
def test_study_write_equals_the_module(write, forget_bias, shift):
    """Each study mode the module has is the module's own computation (qknorm: memory_scores
    'qknorm', the same parameter names; --forget-bias: memory_forget_bias; --shift:
    memory_write_shift), so the study's numbers are the module's."""
    token = write.endswith("token")
    slots = 8 if token else 6
    knobs = dict(memory_write="token" if token else "attention",
                 memory_scores="qknorm" if write.startswith("qknorm") else "dot")
    module_model, spec = ms.build(_cfg(write="module", slots=slots, forget_bias=forget_bias, shift=shift, **knobs), 0)
    study_model, _ = ms.build(_cfg(write=write, slots=slots, forget_bias=forget_bias, shift=shift), 0)
    assert _memory_of(study_model).config.memory_forget_bias == forget_bias
    assert _memory_of(module_model).config.memory_write_shift == shift
    assert _memory_of(study_model).config.memory_write_shift == 0  # the study's forward does the shift
    for m in (module_model, study_model):
        m.double()
    with torch.no_grad():
        for p in module_model.parameters():
            p.normal_(0.0, 0.3)
    study_model.load_state_dict(module_model.state_dict())
    batch = make_batch(spec, 3, 0)
    mask = attention_mask(spec.seq_length, spec.chunk)
    a, b = ms._forward(module_model, batch, mask), ms._forward(study_model, batch, mask)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-12
    # The diagnostics record the logit scales the module has (qknorm-token: the read's only).
    diag = ms.memory_diagnostics(study_model, batch, mask)
    module = _memory_of(module_model)
    assert {k.split(".", 1)[1] for k in diag if k.endswith("_logit_scale")} == set(module.config.memory_logit_scales)
    for name in module.config.memory_logit_scales:
        assert diag[f"layer{module.layer_number}.{name}"] == pytest.approx(getattr(module, name).tolist())


def _asked(batch, spec):
    """(key in the question, its label) for every answer position."""
    rows, cols = batch.loss_mask.nonzero(as_tuple=True)
    return rows, batch.tokens[rows, cols], batch.labels[rows, cols], cols


@pytest.mark.parametrize("name,kw", [("fact", {}), ("mqar", {"pairs": 4}), ("persist", {"hops": 3})])
def test_recall_tasks_answer_from_chunk_zero_only(name, kw):
    spec = TaskSpec(name, 16, **kw)
    batch = make_batch(spec, 8, 3)
    assert batch.tokens.shape == (8, spec.seq_length) == (8, 16 * spec.num_chunks)
    rows, keys, labels, cols = _asked(batch, spec)
    assert len(rows) == 8 * (kw.get("pairs", 1))
    assert bool((cols >= spec.seq_length - spec.chunk).all())  # asked in the last chunk
    values = spec.mqar_spec().value_ids
    for r, k, v in zip(rows.tolist(), keys.tolist(), labels.tolist()):
        fact = batch.tokens[r, : spec.chunk].tolist()
        i = fact.index(k)  # the key occurs in chunk 0, followed by its value
        assert fact[i + 1] == v and v in values
        # nowhere else before the last chunk: only the memory can carry it
        assert k not in batch.tokens[r, spec.chunk : spec.seq_length - spec.chunk].tolist()
    assert int(batch.fact_mask.sum()) == 2 * len(rows)
    ablated = without_facts(spec, batch, 0)
    assert not bool((ablated.tokens[:, : spec.chunk] >= spec.mqar_spec().key_ids.start).any())
    assert torch.equal(ablated.tokens[:, spec.chunk :], batch.tokens[:, spec.chunk :])


@pytest.mark.parametrize("name,pairs,hops", [("fact", 1, 1), ("mqar", 16, 1), ("persist", 1, 3)])
def test_with_other_keys_asks_a_key_the_facts_do_not_hold(name, pairs, hops):
    spec = TaskSpec(name, chunk=32 if pairs == 1 else 64, pairs=pairs, hops=hops, num_keys=64 if pairs > 8 else 32)
    batch = make_batch(spec, 16, 4)
    swapped = with_other_keys(spec, batch, 0)
    keys = spec.mqar_spec().key_ids
    changed = swapped.tokens != batch.tokens
    assert torch.equal(changed, batch.loss_mask.bool())  # the asked keys, and nothing else
    for row in range(16):
        fact_keys = {t for t in batch.tokens[row][batch.fact_mask[row]].tolist() if t in keys}
        assert len(fact_keys) == pairs
        for t in swapped.tokens[row][batch.loss_mask[row].bool()].tolist():
            assert t in keys and t not in fact_keys
    assert torch.equal(swapped.labels, batch.labels)
    with pytest.raises(ValueError, match="two-hop"):
        with_other_keys(TaskSpec("twohop", chunk=96), make_batch(TaskSpec("twohop", chunk=96), 2, 0), 0)


def _qa2_text(seed: int, max_tokens: int):
    """(words, question, target) of the story twohop_story keeps, from the generator's own text."""
    import random

    for attempt in range(1000):
        facts, question, target = babilong_gen.STORIES["qa2"](random.Random(f"memory_tasks/twohop/{seed}/{attempt}"))
        text = " ".join(facts).replace(".", " .").lower().split()
        if len(text) <= max_tokens:
            return text, question, target
    raise AssertionError(f"no qa2 story of <= {max_tokens} words for seed {seed}")


def test_twohop_story_is_babilong_qa2_and_answer_is_its_target():
    ids, obj, place = twohop_story(5, 56)
    words = {i: w for w, i in ms_twohop_ids().items()}
    # Re-derive the story from the generator and check the tokens spell it.
    text, question, target = _qa2_text(5, 56)
    assert [words[i] for i in ids] == text
    assert words[place] == target.lower() and words[obj] == question.rstrip("?").split()[-1]
    spec = TaskSpec("twohop", 128)
    batch = make_batch(spec, 4, 0)
    rows, _, labels, cols = _asked(batch, spec)
    assert len(rows) == 4 and bool((cols >= 128).all())
    assert int(batch.fact_mask[:, 128:].sum()) == 0 and 40 <= int(batch.fact_mask[0].sum()) <= 96
    assert {words[int(v)] for v in labels} <= set(babilong_gen.PLACES)


def test_last_place_shortcut_matches_the_stories_text():
    # The one-hop bar for two-hop, restated from the qa2 text: the last place word of each story.
    from megatron_lm2.eval.memory_tasks import TaskBatch, last_place_accuracy

    ids_of, places = ms_twohop_ids(), {p.lower() for p in babilong_gen.PLACES}
    rows, expected = [], []
    for seed in range(24):
        ids, _, place = twohop_story(seed, 96)
        text, _, target = _qa2_text(seed, 96)
        expected.append([w for w in text if w in places][-1] == target.lower())
        rows.append((ids, place))
    S = 160
    tokens = torch.full((len(rows), S), ids_of["the"])
    tokens[:, 120] = ids_of[sorted(places)[0]]  # a place outside the story: not the story's
    fact_mask, loss_mask = torch.zeros(len(rows), S, dtype=torch.bool), torch.zeros(len(rows), S)
    labels = torch.zeros_like(tokens)
    for r, (ids, place) in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
        fact_mask[r, : len(ids)] = True
        loss_mask[r, 150], labels[r, 150] = 1.0, place
    got = last_place_accuracy(TaskBatch(tokens=tokens, labels=labels, loss_mask=loss_mask, fact_mask=fact_mask))
    assert 0 < sum(expected) < len(expected)  # both kinds of story are in the sample
    assert got == pytest.approx(sum(expected) / len(expected))


def ms_twohop_ids():
    from megatron_lm2.eval import memory_tasks

    return memory_tasks._TWOHOP_IDS


def test_seconds_long_study_run_saves_resumes_and_reports(tmp_path, capsys):
    results = tmp_path / "runs.jsonl"
    argv = ["--task", "fact", "--chunk", "8", "--slots", "C", "--write", "qknorm", "--models", "lm2,vanilla",
            "--steps", "3", "--eval-every", "2", "--eval-samples", "8", "--batch-size", "4",
            "--results", str(results)]
    assert ms.main(argv) == 0
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["model"], r["write"], r["slots"]) for r in runs] == [("lm2", "qknorm", 8), ("vanilla", "none", 8)]
    lm2 = runs[0]
    assert [s for s, _ in lm2["curve"]] == [0, 2, 3]
    d0 = lm2["diagnostics"][0]
    assert d0["step"] == 0 and d0["grad_norm"]["layer1.linear_q"] > 0
    assert 0 < d0["layer1.write_entropy"] <= 1 and 0 < d0["layer1.read_entropy"] <= 1
    assert "without_facts_accuracy" in lm2 and lm2["seconds"] >= lm2["train_seconds"] > 0
    assert 0 <= lm2["other_key_accuracy"] <= 1
    learned, answers = d0["answers_learned"]
    assert 1 <= answers <= 8 and 0 <= learned <= answers and len(d0["accuracy_by_answer"]) == answers
    assert len(lm2["losses"]) == len(lm2["grad_norms"]) == 3 and all(g > 0 for g in lm2["grad_norms"])
    assert ms.loss_spikes(lm2["losses"]) == []
    capsys.readouterr()
    assert ms.main(argv) == 0  # everything done: both skipped, nothing appended
    assert capsys.readouterr().out.count("skip") == 2
    assert len(results.read_text().splitlines()) == 2
    md = tmp_path / "table.md"
    assert ms.main(["--report", "--results", str(results), "--report-md", str(md),
                    "--plot-prefix", str(tmp_path / "plot")]) == 0
    assert "| one fact | 8 | 8 | qknorm(tau 10/10) |" in md.read_text()
    assert "| 10.0 / 10.0 |" in md.read_text()  # the diagnostics' logit scales at init, read / write
    assert (tmp_path / "plot_accuracy.png").stat().st_size > 0


def test_interrupted_run_resumes_from_its_checkpoint_exactly(tmp_path, capsys):
    common = ["--task", "fact", "--chunk", "8", "--slots", "8", "--steps", "6", "--eval-every", "2",
              "--eval-samples", "8", "--batch-size", "4", "--ckpt-every", "1", "--ckpt-dir", str(tmp_path / "ck")]
    whole = tmp_path / "whole.jsonl"
    assert ms.main(common + ["--results", str(whole)]) == 0
    # Interrupt the same run at step 4: its checkpoint (state at the start of step 4) stays behind.
    args = ms.parse_args(common + ["--results", str(tmp_path / "part.jsonl"), "--steps", "6"])
    cfg = dict(task="fact", chunk=8, slots=8, pairs=1, hops=1, model="lm2", write="attention", tau_read=None,
               tau_write=None, steps=6, batch_size=4, lr=args.lr)
    real_eval = ms.answer_hits
    calls = {"n": 0}

    def stop_after_checkpoint(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the eval at step 4, just after its checkpoint was written
            raise KeyboardInterrupt
        return real_eval(*a, **k)

    ms.answer_hits = stop_after_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            ms.train_one(cfg, 0, args)
    finally:
        ms.answer_hits = real_eval
    assert os.path.exists(ms.checkpoint_path(args, {**cfg, "seed": 0}))
    capsys.readouterr()
    assert ms.main(common + ["--results", str(tmp_path / "part.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "resumed at step 4" in out and "step 0 acc" not in out and "step 2 acc" not in out
    a = json.loads(whole.read_text())
    b = json.loads((tmp_path / "part.jsonl").read_text())
    assert a["curve"] == b["curve"] and a["final_loss"] == b["final_loss"]
    assert not os.listdir(tmp_path / "ck")  # removed once the run is recorded


@pytest.mark.parametrize("task,chunk,extra", [("fact", 16, {}), ("mqar", 32, {"pairs": 4}),
                                               ("persist", 16, {"hops": 3}), ("twohop", 96, {})])
def test_vanilla_twin_has_no_path_across_the_window(task, chunk, extra):
    """The study's control: with the attention window equal to C, the vanilla twin's logits in the
    question's chunk are a function of that chunk alone, so its accuracy is chance for every C,
    task and seed, trained or not. Shown here for random weights and the study's own batches:
    everything before the last chunk is replaced by another sample's, the answer logits stay
    bit-identical; the LM2 twin's move (the memory is its one path across)."""
    logits = {}
    for model_kind in ("vanilla", "lm2"):
        model, spec = ms.build(_cfg(task=task, chunk=chunk, slots=chunk, model=model_kind, **extra), 0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        a, b = make_batch(spec, 4, 1), make_batch(spec, 4, 2)
        last = spec.seq_length - spec.chunk
        mixed = ms.TaskBatch(torch.cat([b.tokens[:, :last], a.tokens[:, last:]], 1), a.labels, a.loss_mask,
                             a.fact_mask)
        assert bool((mixed.tokens[:, :last] != a.tokens[:, :last]).any())
        asked = a.loss_mask.bool()
        assert bool(asked[:, :last].sum() == 0) and int(asked.sum()) > 0  # answers only in the last chunk
        with torch.no_grad():
            logits[model_kind] = [ms._forward(model, batch, attention_mask(spec.seq_length, spec.chunk))[asked]
                                  for batch in (a, mixed)]
    assert torch.equal(*logits["vanilla"])
    assert (logits["lm2"][0] - logits["lm2"][1]).abs().max() > 1e-3


def test_full_attention_twin_sees_the_facts_and_is_no_memory_model():
    """--models full: the vanilla flavor with causal attention over the whole sample, the bound
    for what this model and budget learn when attention can see the facts. It has no memory, no
    window, and its answer logits depend on chunk 0 (the vanilla twin's do not: the test above)."""
    model, spec = ms.build(_cfg(task="mqar", chunk=32, slots=32, pairs=4, model="full", write="none"), 0)
    assert not ms.memory_modules(model) and model.config.attention_window is None
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    a, b = make_batch(spec, 4, 1), make_batch(spec, 4, 2)
    mixed = ms.TaskBatch(torch.cat([b.tokens[:, :spec.chunk], a.tokens[:, spec.chunk:]], 1), a.labels,
                         a.loss_mask, a.fact_mask)
    asked = a.loss_mask.bool()
    with torch.no_grad():
        same, other = (ms._forward(model, batch, None)[asked] for batch in (a, mixed))
    assert (same - other).abs().max() > 1e-3
    assert ms._label(dict(model="full", write="none")) == "vanilla, full attention"
    with pytest.raises(SystemExit, match="unknown model 'oracle'"):
        list(ms.configs_of(ms.parse_args(["--models", "lm2,oracle"])))


def test_a_plan_runs_side_by_side_skips_what_is_done_and_names_a_bad_line(tmp_path, capsys):
    """--plan: one process per (line, model, seed), --jobs at a time, into one results file; a rerun
    starts nothing; a deadline of 0 starts nothing, a later one stops what runs (not a failure); a line
    that is not the tool's flags is named."""
    results, plan = tmp_path / "runs.jsonl", tmp_path / "plan.txt"
    tiny = "--chunk 8 --slots C --steps 2 --eval-every 2 --eval-samples 8 --batch-size 4"
    plan.write_text(f"# two lines, three configs\n--task fact {tiny} --write token\n\n"
                    f"--task fact {tiny} --models lm2,vanilla --seeds 1  # the control too\n")
    argv = ["--plan", str(plan), "--jobs", "2", "--results", str(results), "--ckpt-dir", str(tmp_path / "ckpt")]
    assert ms.main(argv) == 0
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["model"], r["write"], r["seed"]) for r in runs) == [
        ("lm2", "attention", 1), ("lm2", "token", 0), ("vanilla", "none", 1)]
    assert all([s for s, _ in r["curve"]] == [0, 2] for r in runs)
    assert len(list((tmp_path / "memory_study_logs").iterdir())) == 3
    assert ms.main(argv) == 0 and len(results.read_text().splitlines()) == 3  # nothing left to run
    plan.write_text(plan.read_text() + f"--task fact {tiny} --write token --seeds 5\n")
    assert ms.main(argv + ["--deadline-s", "0"]) == 0 and len(results.read_text().splitlines()) == 3
    capsys.readouterr()
    assert ms.main(argv + ["--deadline-s", "2"]) == 0  # started, then stopped: not a failure, nothing recorded
    assert "job 0: stopped at the deadline" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == 3
    plan.write_text("--task fact --chunk 8\n--tusk fact\n")
    with pytest.raises(SystemExit, match=r"plan.txt:2: not flags of memory_scaling.py"):
        ms.plan_jobs(str(plan))


def test_the_shipped_plan_parses_into_distinct_configs():
    """benchmarks/memory_study_plan.txt is what a GPU call or a CPU resume runs unattended: every line
    must be the tool's flags, and no config may be listed twice (a rerun would skip the second)."""
    path = os.path.join(os.path.dirname(ms.__file__), "memory_study_plan.txt")
    jobs = ms.plan_jobs(path)
    keys = [ms.job_key(flags) for flags in jobs]
    assert len(jobs) > 100 and len(set(keys)) == len(keys)
    assert any("identity-signs" in flags for flags in jobs)


def test_loss_spikes_are_steps_far_above_the_recent_median():
    calm = [2.8 + 0.05 * ((i * 7) % 5 - 2) for i in range(120)]
    spiky = list(calm)
    spiky[60], spiky[100], spiky[101] = 13.4, 12.4, 5.5  # the C = 256 token runs' kind: 2.8 -> 12-13
    assert ms.loss_spikes(calm) == []
    assert ms.loss_spikes(spiky) == [60, 100]  # 5.5 < 2 x 2.8
    assert ms.loss_spikes(spiky[:55]) == []  # nothing before a full window
    learned = [0.05 + 0.01 * (i % 3) for i in range(60)] + [0.3]  # 6x the median, but 0.25 nats
    assert ms.loss_spikes(learned) == []
    line = ms.report_text([dict(task="fact", chunk=8, slots=8, pairs=1, hops=1, model="lm2", write="token",
                                seed=0, steps=2, batch_size=4, curve=[(0, 0.1), (2, 0.2)], final_accuracy=0.2,
                                best_accuracy=0.2,
                                steps_to_50=None, steps_to_90=None, chance=1 / 16, diagnostics=[],
                                seconds=1.0, train_seconds=1.0, eval_seconds=0.0, losses=spiky)]).splitlines()[2]
    assert "| 2 | 6.2 |" in line  # the spikes column, then chance


def test_report_keeps_runs_of_another_learning_rate_apart():
    run = dict(task="fact", chunk=8, slots=8, pairs=1, hops=1, model="lm2", write="token", seed=0, steps=2,
               batch_size=4, lr=ms.DEFAULT_LR, curve=[(0, 0.1), (2, 0.95)], final_accuracy=0.95,
               best_accuracy=0.95, steps_to_50=2, steps_to_90=2, chance=1 / 16, diagnostics=[],
               seconds=1.0, train_seconds=1.0, eval_seconds=0.0)
    slow = dict(run, lr=1e-3, curve=[(0, 0.1), (2, 0.3)], final_accuracy=0.3, best_accuracy=0.3,
                steps_to_50=None, steps_to_90=None)
    rows = [line for line in ms.report_text([run, slow]).splitlines() if line.startswith("| one fact | 8 | 8 |")]
    assert len(rows) == 2
    assert rows[0].startswith("| one fact | 8 | 8 | token | 1 (0) | 95.0") and "| 2 (2) | 2 (2) |" in rows[0]
    assert rows[1].startswith("| one fact | 8 | 8 | token, lr 0.001 | 1 (0) | 30.0") and "| >2 (>2) |" in rows[1]
    # A forget-gate bias is a config of its own too; records from before the flag have none.
    biased = dict(slow, forget_bias=3.0)
    rows = [line for line in ms.report_text([run, slow, biased]).splitlines() if line.startswith("| one fact | 8 | 8 |")]
    assert [r.split(" | ")[3] for r in rows] == ["token", "token, forget bias +3, lr 0.001", "token, lr 0.001"]
    assert ms.run_key(biased) != ms.run_key(slow) and ms.run_key(slow) == ms.run_key(dict(slow, forget_bias=0.0))


def test_held_out_hits_build_no_autograd_graph(monkeypatch):
    """The evaluation runs without grad: a kept graph per held-out micro-batch doubled a C = 256
    run's peak memory (12 GB, and an OOM kill with two runs side by side)."""
    model, spec = ms.build(_cfg(), 0)
    batch = make_batch(spec, 6, 1)
    grad_seen, forward = [], ms._forward
    monkeypatch.setattr(ms, "_forward", lambda *a: grad_seen.append(torch.is_grad_enabled()) or forward(*a))
    hits = ms.answer_hits(model, batch, attention_mask(spec.seq_length, spec.chunk), micro=4)
    assert grad_seen == [False, False] and torch.is_grad_enabled()
    assert hits.shape == (int(batch.loss_mask.sum()),) and model.training


def test_accuracy_by_answer_counts_each_answer_token_on_its_own():
    """Per answer id, against a row-by-row count; mqar has several answers per row."""
    batch = make_batch(TaskSpec("mqar", chunk=16, pairs=4), 32, 5)
    answers = batch.labels[batch.loss_mask.bool()]
    hits = (answers % 3 == 0) | (torch.arange(len(answers)) % 5 == 0)
    got = ms.accuracy_by_answer(hits, batch)
    right, seen, k = {}, {}, 0
    for row in range(batch.tokens.shape[0]):
        for pos in range(batch.tokens.shape[1]):
            if batch.loss_mask[row, pos]:
                a = int(batch.labels[row, pos])
                seen[a] = seen.get(a, 0) + 1
                right[a] = right.get(a, 0) + int(hits[k])
                k += 1
    assert k == len(hits) and set(got) == set(seen) and len(got) > 4
    for a in seen:
        assert got[a] == round(right[a] / seen[a], 4)
    assert any(0 < v < 1 for v in got.values())


def test_accuracy_by_fact_position():
    """The held-out accuracy split by where each fact ends in chunk 0, quarter by quarter."""
    spec = TaskSpec("fact", chunk=16)
    batch = make_batch(spec, 64, 3)
    where = torch.arange(batch.tokens.shape[1]).expand_as(batch.fact_mask)
    last = torch.where(batch.fact_mask, where, -1).amax(1)
    assert (last >= 0).all() and (last < 16).all()
    hits = last < 8  # right on the first half of the chunk only
    quarters = ms.accuracy_by_fact_position(hits, batch, 16)
    assert quarters[:2] == [1.0, 1.0] and quarters[2:] == [0.0, 0.0]
    assert ms.accuracy_by_fact_position(hits, make_batch(TaskSpec("mqar", chunk=16, pairs=4), 8, 3), 16) == []


def test_memory_probe_reads_the_slots_it_names(tmp_path):
    """benchmarks/memory_probe.py: slot_mass against a loop; on a small checkpoint, its accuracies
    against the study tool's own evaluation of the same held-out batch."""
    import memory_probe

    g = torch.Generator().manual_seed(0)
    read = torch.rand(5, 3, 8, 8, generator=g)
    pos, slots = torch.tensor([8, 9, 15, 10, 12]), torch.tensor([0, 7, 3, 3, 5])
    want = torch.stack([read[b, :, pos[b] - 8, slots[b]] for b in range(5)])
    assert torch.equal(memory_probe.slot_mass(read, pos, slots, 8), want)

    cfg = dict(_cfg(write="qknorm-token", slots=8, tau_write=None), seed=1)
    model, spec = ms.build(cfg, 1)
    path = tmp_path / "ckpt.pt"
    torch.save(dict(model=model.state_dict(), step=7, cfg=cfg), path)
    r = memory_probe.probe(str(path), samples=32)
    held = make_batch(spec, 32, ms.EVAL_SEED)
    mask = attention_mask(spec.seq_length, spec.chunk, "cpu")
    assert r["step"] == 7 and r["accuracy"] == pytest.approx(ms.accuracy(model, held, mask))
    assert r["other_key_accuracy"] == pytest.approx(ms.accuracy(model, with_other_keys(spec, held, ms.EVAL_SEED + 2), mask))
    key, value = memory_probe.fact_slots(held)
    assert torch.equal(held.tokens[torch.arange(32), key] >= spec.mqar_spec().key_ids.start, torch.ones(32, dtype=torch.bool))
    assert (held.tokens[torch.arange(32), value] >= spec.mqar_spec().value_ids.start).all()
    values = held.tokens[torch.arange(32), value]
    weighted = sum(a * int((values == v).sum()) for v, a in r["by_value"].items()) / 32
    assert weighted == pytest.approx(r["accuracy"])
    for k, v in r.items():
        if "_mass_" in k and v is not None:
            assert len(v) == model.config.memory_heads and all(0 <= x <= 1 for x in v)
    with pytest.raises(SystemExit, match="token write"):
        torch.save(dict(model=model.state_dict(), step=0, cfg=dict(cfg, write="attention")), path)
        memory_probe.probe(str(path))


def test_tied_qk_init_points_the_first_read_at_the_value_slot():
    """memory_qk_init="tied" with the write shift: before any training, the question's read puts
    several times the uniform 1/N on the slot that holds the fact's key with its value; independently
    drawn keys leave it near uniform. Measured on the one-fact task at C = N = 32, every layer."""
    import memory_probe

    tied = memory_probe.mass_at_init(32, "tied", shift=1, samples=32)
    plain = memory_probe.mass_at_init(32, "independent", shift=1, samples=32)
    assert all(value > 5.0 for value, _ in tied), tied
    assert all(value < 2.0 for value, _ in plain), plain
    # Without the shift the value's slot holds the value alone and the key's own slot takes the read.
    unshifted = memory_probe.mass_at_init(32, "tied", shift=0, samples=32)
    assert all(key > 10.0 > 1.0 > value for value, key in unshifted), unshifted


def test_report_keeps_every_recorded_knob_apart():
    # The report's rows and plot colours are keyed by _label: a knob added to LATER_KEYS but not to the
    # label merges its runs with their twins (the runs of 2026-12-06 (097fc56) found tied and independent keys in one row).
    other = {"adam_eps": 1e-6, "forget_bias": 3.0, "shift": 1, "init": "identity-signs", "qk_init": "tied"}
    assert set(other) == {k for k, _, _ in ms.LATER_KEYS}  # a new knob needs a value here, and a label
    base = dict(task="mqar", pairs=16, hops=1, chunk=128, slots=128, model="lm2", write="qknorm-token",
                tau_read=10.0, tau_write=None, steps=1000, batch_size=32, lr=1e-3)
    for key, default, _ in ms.LATER_KEYS:
        assert other[key] != default
        assert ms._group_key(dict(base, **{key: default})) == ms._group_key(base)  # absent = the default
        assert ms._group_key(dict(base, **{key: other[key]})) != ms._group_key(base), key
