"""The quickstart's Hugging Face step: the trained debug LM2, exported by `lm2-convert to-hf`, is
loaded back with `transformers` alone (its own modeling code, trust_remote_code) and

1. continues a held-out story of the synthetic corpus (greedy, memory carried by generate());
2. answers that corpus's questions on held-out stories, scored by log-likelihood over every
   possible answer (20 places for "Where is ...?", 30 people and "nobody" for "Who has ...?"),
   against chance.

Honest scale: a 1.8M-parameter model after a few hundred CPU steps on 400 stories. It learns the
format (an answer is a place or a person) long before it learns to recall; expect it near or a
little above chance. The memory experiment (benchmarks/memory_experiment.md) is where recall
beyond the attention window is shown.

    python examples/quickstart_check.py --hf runs/quickstart/hf --out runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_lm2.data.synthetic_corpus import PEOPLE, PLACES, CorpusConfig, generate_document
from megatron_lm2.eval.mmlu import HFScorer

# Short stories, so that a story and its questions fit the 256-token sequences the quickstart
# trains on; a seed the training corpus (1234) does not use.
HELD_OUT = CorpusConfig(filler_words=40, people=3, objects=2, events=6, questions=4)
SEED = 4321


def answer_choices(question: str) -> list[str]:
    if question.startswith("Where is"):
        return list(PLACES)
    if question.startswith("Who has"):
        return list(PEOPLE) + ["nobody"]
    raise ValueError(f"unknown question form: {question!r}")


def story_and_questions(index: int):
    document = generate_document(index, SEED, HELD_OUT)
    story = document.text.split("\n\nQuestion:")[0]
    return story, document.qa


@torch.no_grad()
def score_choices(model, scorer: HFScorer, context: str, continuations: list[str]) -> list[float]:
    """log p(continuation | context) for each continuation, tokenized as the joined text
    (HFScorer.split_ids). The context runs once; each continuation continues a copy of its
    cache (KV cache and memory banks), which equals a full forward (tests/test_hf_generation.py)."""
    context_ids = scorer.encode(context)
    out = model(torch.tensor([context_ids]), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    first = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
    scores = []
    for continuation in continuations:
        ids = scorer.split_ids(context, continuation)[1]
        logp = float(first[ids[0]])
        if len(ids) > 1:
            rest = model(torch.tensor([ids[:-1]]), past_key_values=cache.copy(), use_cache=True).logits[0]
            logp += float(torch.log_softmax(rest.double(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).sum())
        scores.append(logp)
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="the lm2-convert to-hf folder")
    p.add_argument("--out", required=True, help="where story.txt and recall.json go")
    p.add_argument("--stories", type=int, default=12, help="held-out stories for the recall check")
    p.add_argument("--new-tokens", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    model = AutoModelForCausalLM.from_pretrained(args.hf, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.hf, trust_remote_code=True)
    print(f"[hf] loaded {type(model).__name__} from {args.hf} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")

    story, qa = story_and_questions(0)
    with open(os.path.join(args.out, "story.txt"), "w", encoding="utf-8") as f:
        f.write(story)
    prompt = story[: story.rfind(". ", 0, len(story) * 2 // 3) + 1]  # two thirds, at a sentence end
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or 0)
    continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"[hf] prompt (held-out story, {ids.shape[1]} tokens) ends: ...{prompt[-120:]!r}")
    print(f"[hf] greedy continuation: {continuation!r}")

    scorer = HFScorer(model, tokenizer)
    correct = total = 0
    chance = 0.0
    for index in range(args.stories):
        story, qa = story_and_questions(index)
        for item in qa:
            context = f"{story}\n\nQuestion: {item.question}\nAnswer:"
            choices = answer_choices(item.question)
            scores = score_choices(model, scorer, context, [f" {c}" for c in choices])
            correct += choices[max(range(len(choices)), key=scores.__getitem__)] == item.answer
            total += 1
            chance += 1.0 / len(choices)
    result = {
        "questions": total, "stories": args.stories, "accuracy": correct / total,
        "chance": chance / total, "scored_by": "log-likelihood over every possible answer",
        "caveat": "debug LM2 after the quickstart's CPU steps: near chance is expected at this scale",
    }
    with open(os.path.join(args.out, "recall.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"[hf] recall on {total} questions of {args.stories} held-out stories: "
          f"{100 * result['accuracy']:.1f}% (chance {100 * result['chance']:.1f}%; "
          f"{result['caveat']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
