"""Parity with the benchmarks' own code: BABILong's prompts and answer rule against the benchmark's
rendering and verdicts (tests/data/babilong_*.json, made by its own code at named commits), MMLU's
prompts and normalisations against lm-evaluation-harness's task configs
(tests/data/lm_eval_mmlu_reference.json); the report's averages, header and resume guard; BOS."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.eval.answers import TASKS, compare_answers, is_multi_object
from megatron_lm2.eval.babilong import BUCKETS, BabilongResults, Cell, protocol_header, run_babilong
from megatron_lm2.eval.babilong_prompt_texts import REVISIONS
from megatron_lm2.eval.bos import resolve_bos
from megatron_lm2.eval.prompts import DEFAULT_REVISION, build_prompt, revision_source

DATA = Path(__file__).parent / "data"


def _load(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------- prompts
def test_prompts_equal_the_benchmarks_rendering_for_all_ten_tasks():
    reference = _load("babilong_reference.json")
    assert set(reference["revisions"]) == set(REVISIONS) and DEFAULT_REVISION in REVISIONS
    for revision, entry in reference["revisions"].items():
        assert entry["commit"] == REVISIONS[revision]["commit"]
        assert entry["commit"] in revision_source(revision)
        full = {r["task"] for r in entry["prompts"] if r["use_instruction"] and r["use_examples"]
                and r["use_post_prompt"]}
        assert full == set(TASKS)
        for row in entry["prompts"]:
            ours = build_prompt(row["task"], row["context"], row["question"], row["use_instruction"],
                                row["use_examples"], row["use_post_prompt"], revision=revision)
            assert ours == row["prompt"], (revision, row["task"])


def test_the_current_texts_carry_the_benchmarks_fixes():
    """What issue 15 found in the first draft, and the current revision no longer has."""
    old, new = (lambda t: build_prompt(t, "c", "q", revision="2024-05-15")), (lambda t: build_prompt(t, "c", "q"))
    for typo in ("bedroom.Mary", "Before the kitchen the football", "$location_1&"):
        assert typo in old("qa3") and typo not in new("qa3")
    assert "after that. \n" in old("qa1") and "after that.\n\n<context>" in new("qa1")
    assert "the item remains in the first location.\n\n<example>" in new("qa3")
    with pytest.raises(UserInputError, match="--prompt-revision '1999'"):
        build_prompt("qa1", "c", "q", revision="1999")


# ------------------------------------------------------------------------------ answer rule
def test_answer_rule_equals_the_benchmarks_verdicts():
    cases = _load("babilong_answer_cases.json")["cases"]
    for case in cases:
        got = compare_answers(case["target"], case["output"], case["question"], case["labels"])
        assert got is case["correct"], case


def test_answer_cases_cover_every_branch_of_the_rule():
    cases = _load("babilong_answer_cases.json")["cases"]
    kinds = set()
    for c in cases:
        target = c["target"].lower()
        multi = is_multi_object(target)
        in_question = any(label.lower() in c["question"].lower() and label.lower() in c["output"].lower()
                          for label in c["labels"])
        kinds.add(("multi" if multi else "short-comma" if "," in target else "single", c["correct"]))
        kinds.add(("label in question", c["correct"]) if in_question else ())
    assert {("multi", True), ("multi", False), ("single", True), ("single", False), ("short-comma", True),
            ("short-comma", False), ("label in question", True), ("label in question", False)} <= kinds
    qa8 = [c for c in cases if c["task"] == "qa8" and is_multi_object(c["target"])]
    assert any(c["correct"] for c in qa8) and sum(not c["correct"] for c in qa8) >= 5


# ---------------------------------------------------------------------------------- reports
def _random_results(seed, drop=()):
    rng = random.Random(seed)
    r = BabilongResults(tasks=TASKS)
    for task in TASKS:
        for length in ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k"):
            if (task, length) not in drop:
                total = rng.randint(5, 20)
                r.cells[(task, length)] = Cell(rng.randint(0, total), total)
    return r


def _mean(xs):
    return sum(xs) / len(xs)


def test_report_means_are_over_complete_task_sets():
    r = _random_results(0, drop={("qa7", "16k"), ("qa2", "128k")})
    acc = {k: 100.0 * c.correct / c.total for k, c in r.cells.items()}
    summary = r.to_dict()
    # QA1-QA5: complete at 16k (qa7 is not in it), not at 128k (qa2 is).
    qa5 = summary["task_sets"]["qa1-qa5"]
    assert qa5["16k"] == pytest.approx(_mean([acc[(t, "16k")] for t in TASKS[:5]]))
    assert qa5["128k"] is None
    assert summary["task_sets"]["qa1-qa10"]["16k"] is None
    assert summary["task_sets"]["qa1-qa10"]["8k"] == pytest.approx(_mean([acc[(t, "8k")] for t in TASKS]))
    assert summary["per_length"]["16k"] == {"mean": pytest.approx(_mean([acc[(t, "16k")] for t in TASKS
                                                                         if t != "qa7"])),
                                            "complete": False, "missing": ["qa7"]}
    buckets = summary["buckets"]
    assert set(buckets["qa1-qa5"]) == set(BUCKETS)
    assert buckets["qa1-qa5"]["8K+ (8k-64k)"] == pytest.approx(
        _mean([_mean([acc[(t, l)] for t in TASKS[:5]]) for l in ("8k", "16k", "32k", "64k")]))
    assert buckets["qa1-qa5"]["8K+ (8k-128k)"] is None and buckets["qa1-qa10"]["8K+ (8k-64k)"] is None
    assert buckets["qa1-qa10"]["1K"] == pytest.approx(_mean([acc[(t, "1k")] for t in TASKS]))
    table = r.table()
    assert "* 16k: incomplete, mean over the tasks present (missing qa7)" in table
    assert "| mean qa1-qa5 |" in table
    assert "| length bucket | 0K | 1K | 2K | 4K | 8K+ (8k-64k) | 8K+ (8k-128k) |" in table
    bucket_row = [line for line in table.splitlines() if line.startswith("| mean qa1-qa5 | ")][-1]
    assert bucket_row.split("|")[2:-1] == [f" {buckets['qa1-qa5'][b]:.1f} " if buckets["qa1-qa5"][b] is not None
                                           else " n/a " for b in BUCKETS]


def _oracle(prompt):
    return "kitchen"


def test_run_writes_the_protocol_header_and_refuses_to_mix_protocols(tmp_path):
    from megatron_lm2.eval.babilong_gen import generate_sample

    def loader(root, task, length, limit):
        return [generate_sample(task, 0, i) for i in range(3)]

    header = protocol_header("2024-05-15", bos="off (test)", max_new_tokens=7)
    out = tmp_path / "out"
    results = run_babilong(_oracle, "unused", ["qa1"], ["0k"], str(out), progress=False, loader=loader,
                           revision="2024-05-15", header=header)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["header"] == header == results.header
    assert header["prompt_revision"] == "2024-05-15" and REVISIONS["2024-05-15"]["commit"] in header["prompt_source"]
    assert header["decoding"].startswith("greedy, 7 new tokens") and header["bos"] == "off (test)"
    assert "shots" in header
    table = results.table()
    assert table.splitlines()[0] == "prompt_revision: 2024-05-15" and "bos: off (test)" in table
    with pytest.raises(UserInputError, match="prompt_revision = '2024-05-15', this run has '2024-06-04'"):
        run_babilong(_oracle, "unused", ["qa1"], ["0k"], str(out), progress=False, loader=loader)
    again = run_babilong(lambda p: pytest.fail("a finished cell ran again"), "unused", ["qa1"], ["0k"], str(out),
                         progress=False, loader=loader, revision="2024-05-15", header=header)
    assert again.cells == results.cells


def test_prompt_parts_switch_off_as_the_benchmarks_runner_does():
    from megatron_lm2.eval.babilong_gen import generate_sample
    from megatron_lm2.eval.prompts import parse_prompt_parts

    assert parse_prompt_parts("post_prompt,instruction") == ("instruction", "post_prompt")
    assert parse_prompt_parts("none") == ()
    with pytest.raises(UserInputError, match="--prompt-parts 'examples,shots'"):
        parse_prompt_parts("examples,shots")
    samples = [generate_sample("qa2", 0, i) for i in range(2)]
    for parts in ((), ("instruction", "post_prompt")):
        seen = []
        results = run_babilong(lambda p: seen.append(p) or "x", "unused", ["qa2"], ["0k"], progress=False,
                               loader=lambda *a: samples, prompt_parts=parts)
        assert seen == [build_prompt("qa2", s["input"], s["question"], "instruction" in parts, "examples" in parts,
                                     "post_prompt" in parts) for s in samples]
        assert results.header["prompt_parts"].startswith(", ".join(parts) or "none")
        assert results.header["shots"].startswith("none (0-shot")


# ---------------------------------------------------------------------------------------- BOS
def _byte_tokenizer_with_bos(template: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"], vocab["<bos>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if template:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", bos_token="<bos>")


class _Config:
    def __init__(self, model_type):
        self.model_type = model_type


class _Model:
    def __init__(self, model_type):
        self.config = _Config(model_type)

    def eval(self):
        return self


def test_bos_flag_and_what_each_setting_encodes():
    from megatron_lm2.eval.decode import HFGenerator
    from megatron_lm2.eval.mmlu import leading_special_ids

    assert resolve_bos("auto", lm2=True)[0] is False and "auto" in resolve_bos("auto", lm2=True)[1]
    assert resolve_bos("auto", lm2=False)[0] is None
    assert resolve_bos("on", lm2=True)[0] is True and resolve_bos("off", lm2=False)[0] is False
    with pytest.raises(UserInputError, match="--bos 'maybe'"):
        resolve_bos("maybe", lm2=True)
    tok = _byte_tokenizer_with_bos(template=True)
    bare = tok("Where is Mary?", add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    assert HFGenerator(_Model("llama"), tok).encode("Where is Mary?") == [bos] + bare  # tokenizer default
    assert HFGenerator(_Model("lm2"), tok).encode("Where is Mary?") == bare  # auto for LM2: off
    assert HFGenerator(_Model("lm2"), tok, bos=True).encode("Where is Mary?") == [bos] + bare
    assert HFGenerator(_Model("llama"), tok, bos=False).encode("Where is Mary?") == bare
    plain = _byte_tokenizer_with_bos(template=False)  # knows a BOS but does not add it
    assert HFGenerator(_Model("llama"), plain, bos=True).encode("x") == [bos] + plain("x")["input_ids"]
    assert leading_special_ids(tok) == (bos,) and leading_special_ids(plain) == ()


def test_megatron_generator_puts_the_bos_in_front_when_asked():
    from megatron_lm2.eval.decode import MegatronGenerator

    class Tok:
        bos, eod, pad = 1, 2, 0

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    seen = []
    for bos in (False, True):
        generator = MegatronGenerator.__new__(MegatronGenerator)  # only the text <-> ids layer is under test
        generator.tokenizer, generator.bos, generator.eod = Tok(), bos, Tok.eod
        generator.generate_ids = lambda ids: seen.append(list(ids)) or [ord("k"), Tok.eod]
        assert generator("ab") == "k"
    assert seen == [[97, 98], [1, 97, 98]]


# -------------------------------------------------------------------------------------- MMLU
def _render(template: str, q) -> str:
    """lm-eval's Jinja fields of the mmlu configs: {{question.strip()}} and {{choices[i]}}."""
    text = template.replace("{{question.strip()}}", q.question.strip())
    for i, choice in enumerate(q.choices):
        text = text.replace(f"{{{{choices[{i}]}}}}", choice)
    assert "{{" not in text, text
    return text


def _questions(subject):
    from megatron_lm2.eval.mmlu import Question

    return [Question(subject, "  Which bone is in the upper arm? ", ("femur", "humerus", "tibia", "skull"), 1),
            Question(subject, "Which organ pumps blood?", ("heart", "lung", "liver", "kidney"), 0),
            Question(subject, "Où est le cœur ?", ("à gauche", "right", "centre", "nowhere"), 0)]


@pytest.mark.parametrize("fmt", ["letters", "cloze"])
@pytest.mark.parametrize("subject", ["anatomy", "high_school_biology"])
def test_mmlu_contexts_are_lm_evals(fmt, subject):
    from megatron_lm2.eval.mmlu import build_context, continuations

    ref = _load("lm_eval_mmlu_reference.json")
    task = ref["tasks"][f"{fmt}/{subject}"]
    tgt, few = ref["delimiters"]["target"], ref["delimiters"]["fewshot"]
    assert task["fewshot_split"] == "dev" and task["fewshot_config"]["sampler"] == "first_n"
    dev, (q, *_) = _questions(subject)[1:], _questions(subject)
    for shots in (0, 2):

        def answer(d):
            return task["doc_to_choice"][d.answer] if fmt == "letters" else d.choices[d.answer]

        expected = task["description"] + "".join(_render(task["doc_to_text"], d) + tgt + answer(d) + few
                                                 for d in dev[:shots]) + _render(task["doc_to_text"], q)
        assert build_context(q, fmt, dev[:shots]) == expected
    choices = task["doc_to_choice"] if fmt == "letters" else list(q.choices)  # "{{choices}}": the texts
    assert continuations(q, fmt) == [tgt + c for c in choices]


def test_mmlu_cloze_normalisations_are_lm_evals():
    """acc (sum), acc_norm (per character of the choice, lm-eval's len(choice)) and acc_bytes (per
    UTF-8 byte) each pick a different choice here; the old per-character-with-the-space rule
    would pick yet another combination."""
    from megatron_lm2.eval.mmlu import Question, score_mmlu

    ref = _load("lm_eval_mmlu_reference.json")
    assert "completion_len = np.array([float(len(i)) for i in choices])" in ref["metric_lines"]
    assert 'byte_length = np.array([float(len(i.encode("utf-8"))) for i in choices])' in ref["metric_lines"]
    # choice texts:   "ééé" (3 chars, 6 bytes), "abcd" (4, 4), "xy" (2, 2)
    lls = {" ééé": -3.3, " abcd": -4.2, " xy": -2.9}

    class Scorer:
        def loglikelihood(self, context, continuation):
            return lls[continuation]

    q = Question("anatomy", "?", ("ééé", "abcd", "xy"), 0)

    def picked(norm):
        return max(range(3), key=lambda i: lls[" " + q.choices[i]] / norm(q.choices[i]))

    by_sum, by_char, by_byte = picked(lambda c: 1), picked(len), picked(lambda c: len(c.encode()))
    assert len({by_sum, by_char, by_byte}) == 3
    for answer in range(3):
        r = score_mmlu(Scorer(), [Question("anatomy", "?", q.choices, answer)], "cloze", progress=False)
        assert (r.accuracy, r.accuracy_norm, r.accuracy_bytes) == (100.0 * (by_sum == answer),
                                                                   100.0 * (by_char == answer),
                                                                   100.0 * (by_byte == answer))
        assert r.header["format"] == "cloze" and r.header["shots"] == 0
