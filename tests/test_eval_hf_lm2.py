"""The two evaluation backends against each other on one LM2 model.

A small LM2 (2 layers, attention window 64, memory chunks of 32, the embedded 2k tokenizer) is
made here with random weights, saved as a Megatron dist checkpoint and exported with
`lm2-convert to-hf --tokenizer default`. `lm2-eval` then runs on it twice: `--hf EXPORT`
(LM2ForCausalLM.generate, KV cache and memory carried by the HF code) and `--megatron CKPT
--tokenizer default` (Megatron's forward, window by window through carry_memory). The two
share no model code, so equal outputs check the export and both decoders at once.

An untrained model answers nonsense, but deterministic nonsense: the weights are scaled so
greedy decoding wanders over the vocabulary instead of repeating one token, and every prompt
is several attention windows long, so what the answers depend on beyond the last window
reaches them only through the memory banks.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

WINDOW, CHUNK = 64, 32
TASKS, LENGTHS, SAMPLES = ("qa1", "qa2"), ("0k", "512"), 3
MAX_NEW = 20
TOL = 1e-4


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


def _spread_weights(model, seed=5):
    """Every matrix ~ N(0, 1/fan_in): logits of order 1 that change from token to token (the
    default init gives near-uniform logits and an argmax stuck on one token)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def exported(megatron_world, tmp_path_factory):
    """(Megatron checkpoint dir, HF export dir, BABILong data root)."""
    from megatron.core import dist_checkpointing

    from megatron_lm2.convert.cli import main as convert
    from megatron_lm2.convert.megatron_config import write_config
    from megatron_lm2.eval.cli import main as evaluate
    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.model import build_model, padded_vocab_size
    from megatron_lm2.tokenizer import load_tokenizer
    from megatron_lm2.training.integrity import write_record

    root = tmp_path_factory.mktemp("eval_hf_lm2")
    vocab = padded_vocab_size(load_tokenizer("default").vocab_size, 1)
    config = get_flavor("debug", num_layers=2, seq_length=128, attention_window=WINDOW,
                        memory_chunk_size=CHUNK, vocab_size=vocab)
    model = build_model(config).eval()
    _spread_weights(model)
    ckpt = root / "megatron"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))  # as lm2-train / test_convert do
    write_config(config, ckpt / "lm2_config.json")
    write_record(str(ckpt), 0, True, "test")  # as lm2-train does: a checkpoint without it is refused
    assert convert(["to-hf", "--load", str(ckpt), "--save", str(root / "hf"), "--tokenizer", "default"]) == 0
    assert evaluate(["make-babilong", "--out", str(root / "babilong"), "--tasks", ",".join(TASKS),
                     "--lengths", ",".join(LENGTHS), "--samples", str(SAMPLES), "--tokenizer", "default"]) == 0
    return ckpt, root / "hf", root / "babilong"


@pytest.fixture(scope="module")
def backends(exported):
    from megatron_lm2.eval.backends import load_hf, load_megatron

    ckpt, hf, _ = exported
    return load_hf(str(hf), device="cpu"), load_megatron(str(ckpt), "default")


def _rows(directory, task, length):
    with open(os.path.join(directory, f"{task}_{length}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------ BABILong
def test_babilong_both_backends_same_greedy_answers(exported, backends, tmp_path):
    """`lm2-eval babilong` through --hf and through --megatron: the same prompt ids from both
    tokenizers, the same 20 greedy ids (HF generate() vs MegatronGenerator), each row's text
    the decoding of those ids, and the same per-sample verdicts and per-cell scores.

    The texts are compared through the ids: on a byte sequence that is not valid UTF-8 (an
    untrained model emits them) HF's ByteFallback decoder replaces every byte, SentencePiece
    only the invalid ones, so the two texts may differ there while the tokens are equal."""
    from megatron_lm2.eval.babilong_data import load_split
    from megatron_lm2.eval.cli import main
    from megatron_lm2.eval.decode import MegatronGenerator
    from megatron_lm2.eval.prompts import build_prompt

    ckpt, hf_dir, data = exported
    hf, mg = backends
    common = ["babilong", "--data", str(data), "--tasks", ",".join(TASKS), "--lengths", ",".join(LENGTHS),
              "--max-new-tokens", str(MAX_NEW), "--device", "cpu"]
    assert main(common + ["--hf", str(hf_dir), "--output", str(tmp_path / "hf")]) == 0
    assert main(common + ["--megatron", str(ckpt), "--tokenizer", "default", "--output", str(tmp_path / "mg")]) == 0

    generator = MegatronGenerator(mg.model, mg.tokenizer, max_new_tokens=MAX_NEW)
    assert generator.window == WINDOW
    assert hf.model.generation_config.eos_token_id == mg.tokenizer.eod
    special = {mg.tokenizer.eod, mg.tokenizer.bos, mg.tokenizer.pad}
    answers = []
    for task in TASKS:
        for length in LENGTHS:
            hf_rows, mg_rows = _rows(tmp_path / "hf", task, length), _rows(tmp_path / "mg", task, length)
            records = load_split(str(data), task, length)
            assert len(hf_rows) == len(mg_rows) == len(records) == SAMPLES
            for record, hf_row, mg_row in zip(records, hf_rows, mg_rows):
                where = f"{task} {length} {record['question']!r}"
                prompt = build_prompt(task, record["input"], record["question"])
                ids = mg.tokenizer.encode(prompt)
                assert hf.tokenizer(prompt)["input_ids"] == ids, f"{where}: the tokenizers differ"
                assert len(ids) > 4 * WINDOW
                with torch.no_grad():
                    out = hf.model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                            num_beams=1, pad_token_id=mg.tokenizer.pad)
                answer = out[0, len(ids):].tolist()
                assert answer == generator.generate_ids(ids), f"{where}: the greedy tokens differ"
                assert hf_row["output"] == hf.tokenizer.decode(answer, skip_special_tokens=True), where
                assert mg_row["output"] == mg.tokenizer.decode([i for i in answer if i not in special]), where
                assert (hf_row["target"], hf_row["correct"]) == (mg_row["target"], mg_row["correct"]), where
                answers.append(tuple(answer))
    # Not one answer repeated everywhere: the comparison has something to compare.
    assert len(set(answers)) == len(answers)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("hf", "mg")]
    assert summaries[0] == summaries[1]
    assert set(summaries[0]["cells"]) == {f"{t}/{l}" for t in TASKS for l in LENGTHS}


def test_memory_carries_the_prompt_past_the_window(exported, backends):
    """Next-token logits agree between the backends, and both move when only a past window of
    the prompt changes: that window reaches the answer through the memory alone."""
    from megatron_lm2.eval.babilong_data import load_split
    from megatron_lm2.eval.decode import MegatronGenerator
    from megatron_lm2.eval.prompts import build_prompt

    _, _, data = exported
    hf, mg = backends
    record = load_split(str(data), "qa1", LENGTHS[-1], limit=1)[0]
    ids = mg.tokenizer.encode(build_prompt("qa1", record["input"], record["question"]))
    # The window before the current one: the last one the attention cannot see.
    start = ((len(ids) - 1) // WINDOW - 1) * WINDOW
    changed = list(ids)
    changed[start:start + WINDOW] = [(t * 7 + 3) % mg.tokenizer.vocab_size for t in ids[start:start + WINDOW]]
    generator = MegatronGenerator(mg.model, mg.tokenizer)
    logits = {}
    for name, prompt in (("same", ids), ("changed", changed)):
        with torch.no_grad():
            from_hf = hf.model(torch.tensor([prompt]), use_cache=True).logits[0, -1]
        from_megatron = generator.next_token_logits(prompt)
        assert (from_hf - from_megatron).abs().max().item() <= TOL
        logits[name] = from_hf
    assert (logits["same"] - logits["changed"]).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------- MMLU
QUESTIONS = {
    "anatomy": [("Which bone is in the upper arm?", ("femur", "humerus", "tibia", "skull"), "B"),
                ("Which organ pumps blood around the body?", ("heart", "lung", "liver", "kidney"), "A"),
                ("How many chambers does the human heart have?", ("two", "three", "four", "five"), "C")],
    "astronomy": [("Which of these is a planet of the solar system?", ("Sun", "Moon", "Mars", "Vega"), "C"),
                  ("What is the closest star to the Earth?", ("Sirius", "the Sun", "Polaris", "Rigel"), "B"),
                  ("Which planet has the most prominent rings?", ("Venus", "Mercury", "Earth", "Saturn"), "D")],
}


def _write_mmlu(root):
    """The original release's layout: {split}/{subject}_{split}.csv, no header."""
    for split, rows in (("dev", slice(0, 1)), ("test", slice(1, None))):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, questions in QUESTIONS.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                for question, choices, answer in questions[rows]:
                    csv.writer(f).writerow([question, *choices, answer])


@pytest.mark.parametrize("fmt, shots", [("letters", 1), ("cloze", 0)])
def test_mmlu_loglikelihoods_agree(exported, backends, tmp_path, fmt, shots):
    from megatron_lm2.eval.cli import main
    from megatron_lm2.eval.mmlu import HFScorer, MegatronScorer, build_context, continuations, load_mmlu

    ckpt, hf_dir, _ = exported
    hf, mg = backends
    _write_mmlu(tmp_path / "mmlu")
    questions, dev = load_mmlu(str(tmp_path / "mmlu")), load_mmlu(str(tmp_path / "mmlu"), "dev")
    scorers = HFScorer(hf.model, hf.tokenizer), MegatronScorer(mg.model, mg.tokenizer)
    assert scorers[0].max_length == scorers[1].max_length == 128
    longest = 0
    for q in questions:
        context = build_context(q, fmt, [d for d in dev if d.subject == q.subject][:shots])
        for continuation in continuations(q, fmt):
            split = [s.split_ids(context, continuation) for s in scorers]
            assert split[0] == split[1], f"{continuation!r}: the tokenizers split the text differently"
            longest = max(longest, sum(map(len, split[0])))
            values = [s.loglikelihood(context, continuation) for s in scorers]
            assert values[0] == pytest.approx(values[1], abs=TOL), (q.question, continuation)
    if fmt == "letters":  # the window mask is exercised
        assert longest > WINDOW

    common = ["mmlu", "--data", str(tmp_path / "mmlu"), "--format", fmt, "--shots", str(shots), "--device", "cpu"]
    assert main(common + ["--hf", str(hf_dir), "--output", str(tmp_path / "hf.json")]) == 0
    megatron = ["--megatron", str(ckpt), "--tokenizer", "default"]
    assert main(common + megatron + ["--output", str(tmp_path / "mg.json")]) == 0
    results = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("hf", "mg")]
    assert results[0] == results[1] and results[0]["total"] == 4


def test_continuation_tokens_are_those_of_the_joined_text(backends):
    """SentencePiece alone encodes " A" with an extra word-start piece; the scorer takes the
    continuation's tokens from the joined text instead (what the model reads)."""
    from megatron_lm2.eval.mmlu import MegatronScorer

    _, mg = backends
    scorer = MegatronScorer(mg.model, mg.tokenizer)
    context, continuation = "Question: Which organ pumps blood?\nAnswer:", " A"
    ctx, cont = scorer.split_ids(context, continuation)
    assert ctx + cont == mg.tokenizer.encode(context + continuation)
    assert mg.tokenizer.decode(cont) == "A" and len(cont) == 1


def _bos_template_tokenizer(path, texts):
    """A small byte-level BPE whose tokenizer.json prepends <|begin_of_text|> to every
    encoding, as Llama-3's does; megatron_lm2.tokenizer never adds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|begin_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(path))
    return path


def test_bos_adding_tokenizer_prompts_encode_as_in_training(exported, backends, tmp_path):
    """The same checkpoint exported with a tokenizer.json whose template adds a BOS: the HF
    backend must not add it to an LM2 prompt (the model never saw one in training), so both
    backends still decode the same answer."""
    from megatron_lm2.convert.cli import main as convert
    from megatron_lm2.eval.babilong_data import load_split
    from megatron_lm2.eval.backends import load_hf
    from megatron_lm2.eval.decode import HFGenerator, MegatronGenerator
    from megatron_lm2.eval.prompts import build_prompt
    from megatron_lm2.tokenizer import load_tokenizer

    ckpt, _, data = exported
    _, mg = backends
    records = load_split(str(data), "qa2", LENGTHS[-1])
    prompts = [build_prompt("qa2", r["input"], r["question"]) for r in records]
    path = _bos_template_tokenizer(tmp_path / "tokenizer.json", prompts)
    assert convert(["to-hf", "--load", str(ckpt), "--save", str(tmp_path / "hf"), "--tokenizer", str(path)]) == 0
    hf = load_hf(str(tmp_path / "hf"), device="cpu")
    tok = load_tokenizer(str(path))
    assert hf.tokenizer(prompts[0])["input_ids"][0] == tok.bos  # the template is live on the HF side
    megatron = MegatronGenerator(mg.model, tok, max_new_tokens=MAX_NEW)
    for prompt in prompts:
        assert len(tok.encode(prompt)) > 4 * WINDOW
        assert HFGenerator(hf.model, hf.tokenizer, MAX_NEW)(prompt) == megatron(prompt)
    # Special tokens in an answer are left out of the text on both sides.
    emitted = tok.encode(" moved to the") + [tok.bos] + tok.encode(" garden") + [tok.eod]
    megatron.generate_ids = lambda ids: list(emitted)
    assert megatron("any prompt") == hf.tokenizer.decode(emitted, skip_special_tokens=True) == " moved to the garden"


def test_bos_on_gives_both_backends_the_same_ids(exported, backends):
    """`--bos on` (the benchmark's input, for comparison) puts the same BOS id in front on both
    backends; `auto` (how LM2 was trained) puts none."""
    from megatron_lm2.eval.babilong_data import load_split
    from megatron_lm2.eval.bos import resolve_bos
    from megatron_lm2.eval.decode import HFGenerator, MegatronGenerator
    from megatron_lm2.eval.prompts import build_prompt

    _, _, data = exported
    hf, mg = backends
    record = load_split(str(data), "qa1", "0k", limit=1)[0]
    prompt = build_prompt("qa1", record["input"], record["question"])
    ids = mg.tokenizer.encode(prompt)
    assert mg.tokenizer.bos is not None and hf.tokenizer.bos_token_id == mg.tokenizer.bos
    assert resolve_bos("auto", lm2=True)[0] is False
    assert HFGenerator(hf.model, hf.tokenizer).encode(prompt) == ids
    assert HFGenerator(hf.model, hf.tokenizer, bos=True).encode(prompt) == [mg.tokenizer.bos] + ids
    seen = []
    megatron = MegatronGenerator(mg.model, mg.tokenizer, max_new_tokens=1, bos=True)
    megatron.generate_ids = lambda prompt_ids: seen.append(list(prompt_ids)) or []
    megatron(prompt)
    assert seen == [[mg.tokenizer.bos] + ids]
