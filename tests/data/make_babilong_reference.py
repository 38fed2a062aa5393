"""Regenerate the BABILong prompt data and its test reference from the benchmark's own code.

    python tests/data/make_babilong_reference.py --babilong GIT_DIR   (a clone of booydar/babilong)

Writes megatron_lm2/eval/babilong_prompt_texts.py (the benchmark's qa1-qa10 texts and template,
verbatim, per revision), tests/data/babilong_reference.json (prompts rendered by the benchmark's
get_formatted_input at the same commits) and tests/data/babilong_answer_cases.json (verdicts of
the benchmark's compare_answers on hand-made cases for every branch of it, and on a sample of the
(target, output, question) triples saved in its babilong_evals/). tests/test_babilong_parity.py
compares our code with both. Runs the benchmark's own prompts.py and metrics.py, read with
`git show`; CI does not need the benchmark: the outputs are committed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = [f"qa{i}" for i in range(1, 11)]
# (name, commit, what it is). The names are the commit dates.
REVISIONS = [
    ("2024-06-04", "d7a4fb72c2da634d3f2aec0f4eb818702808178f",
     "the benchmark's current text: qa1-qa10 and the template render the same from this commit through "
     "7a6efee29f5cac03c3c410e6799c80fd2ffe3610 (2026-06-01)"),
    ("2024-05-15", "1d9718c0535d0d4b471357a70b1d503fb8917f50",
     "the first draft with all of qa1-qa10 (single newlines, context not stripped, typos fixed later)"),
]
CASES = [  # (task, context, question, use_instruction, use_examples, use_post_prompt)
    *[(t, "  \n Mary went to the kitchen. Filler text.\n\n", "Where is Mary?", True, True, True) for t in TASKS],
    ("qa1", "Mary went to the kitchen.", "Where is Mary?", False, True, True),
    ("qa8", "Mary went to the kitchen.", "What is Mary carrying?", True, False, False),
    ("qa10", " c ", "q?", False, False, False),
]


def _show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], capture_output=True,
                          text=True, check=True).stdout


def _module(source: str) -> types.ModuleType:
    module = types.ModuleType("babilong_prompts")
    exec(compile(source, "babilong/prompts.py", "exec"), module.__dict__)  # the benchmark's own code
    return module


# Every branch of compare_answers: the cuts of preprocess_output, labels named by the question,
# the multi-object branch (all parts / a part missing / an extra label / repeated or spaced parts)
# and the single-label branch, a short comma target (qa19's "n,e") included.
_QA19 = ["e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"]
ANSWER_CASES = [  # (task or None, labels when task is None, target, output, question)
    ("qa1", None, "kitchen", "The most recent location of Mary is kitchen.", "Where is Mary?"),
    ("qa1", None, "kitchen", "KITCHEN", "Where is Mary?"),
    ("qa1", None, "kitchen", "The most recent location of Mary is garden.", "Where is Mary?"),
    ("qa1", None, "kitchen", "Mary is in the kitchen or the garden.", "Where is Mary?"),
    ("qa1", None, "kitchen", "Mary is in the garden. Before that, the kitchen.", "Where is Mary?"),
    ("qa1", None, "kitchen", "Mary is in the kitchen. Not the garden.", "Where is Mary?"),
    ("qa1", None, "kitchen", "kitchen<context>garden", "Where is Mary?"),
    ("qa1", None, "kitchen", "kitchen\n<example>\nJohn is in the garden", "Where is Mary?"),
    ("qa1", None, "kitchen", "kitchen Question: where is the garden", "Where is Mary?"),
    ("qa1", None, "kitchen", "", "Where is Mary?"),
    ("qa3", None, "bathroom", "Before the kitchen the apple was in the bathroom.",
     "Where was the apple before the kitchen?"),
    ("qa3", None, "kitchen", "The apple was in the kitchen.", "Where was the apple before the kitchen?"),
    ("qa3", None, "bathroom", "bathroom", "Where was the apple before the Kitchen?"),
    ("qa5", None, "Fred", "fred", "Who did Mary give the apple to?"),
    ("qa5", None, "apple", "Fred", "What did Mary give to Fred?"),
    ("qa5", None, "milk", "Mary gave the milk", "What did Mary give to Fred?"),
    ("qa6", None, "yes", "yes", "Is John in the garden?"),
    ("qa6", None, "yes", "no", "Is John in the garden?"),
    ("qa6", None, "no", "yes or no", "Is John in the garden?"),
    ("qa7", None, "none", "none", "How many objects is Mary carrying?"),
    ("qa7", None, "two", "two", "How many objects is Mary carrying?"),
    ("qa7", None, "one", "one", "How many objects is Mary carrying?"),
    ("qa8", None, "apple,milk", "apple,milk", "What is Daniel carrying?"),
    ("qa8", None, "apple,milk", "Daniel is carrying the milk and the apple", "What is Daniel carrying?"),
    ("qa8", None, "apple,milk", "apple, milk", "What is Daniel carrying?"),
    ("qa8", None, "apple,milk", "apple", "What is Daniel carrying?"),
    ("qa8", None, "apple,milk", "apple,milk,football", "What is Daniel carrying?"),
    ("qa8", None, "apple,milk", "apple. milk", "What is Daniel carrying?"),
    ("qa8", None, "apple,milk", "nothing", "What is Daniel carrying?"),
    ("qa8", None, "football,apple", "Apple, Football", "What is Sandra carrying?"),
    ("qa8", None, "apple,milk", "apple,milk", "What is Daniel carrying with the milk?"),
    ("qa8", None, "apple, milk", "apple, milk", "What is Daniel carrying?"),
    ("qa8", None, "apple,apple", "apple", "What is Daniel carrying?"),
    ("qa8", None, "milk,", "milk", "What is Daniel carrying?"),
    ("qa8", None, "nothing", "Nothing.", "What is Daniel carrying?"),
    ("qa8", None, "milk", "milk,apple", "What is Daniel carrying?"),
    ("qa9", None, "no", "No, he is not", "Is John in the bathroom?"),
    ("qa10", None, "maybe", "maybe<example>yes", "Is Bill in the park?"),
    ("qa10", None, "maybe", "Maybe yes", "Is Bill in the park?"),
    (None, _QA19, "n,e", "n,e", "How do you go from the kitchen to the garden?"),
    (None, _QA19, "n,e", "n,e then s,s", "How do you go from the kitchen to the garden?"),
    (None, _QA19, "s,e", "w,n", "How do you go from the kitchen to the garden?"),
]
SAVED_SAMPLE = 300  # triples drawn (every k-th, sorted) from the benchmark's saved predictions


def _saved_triples(git_dir: str, commit: str) -> list[tuple[str, str, str, str]]:
    import csv
    import io

    names = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "-r", "--name-only", commit, "babilong_evals"],
                           capture_output=True, text=True, check=True).stdout.split()
    triples = set()
    for name in names:
        if not name.endswith(".csv"):
            continue
        task = name.rsplit("/", 1)[1].split("_")[0]
        for row in csv.DictReader(io.StringIO(_show(git_dir, commit, name))):
            triples.add((task, row["target"], row["output"] or "", row["question"]))
    return sorted(triples)


def _literal(text: str, indent: int) -> str:
    lines = text.splitlines(keepends=True)
    if len(lines) <= 1:
        return repr(text)
    pad = " " * indent
    return "(\n" + "".join(f"{pad}    {line!r}\n" for line in lines) + f"{pad})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--babilong", required=True, help="git dir of a booydar/babilong clone")
    args = parser.parse_args()
    head = subprocess.run(["git", "--git-dir", args.babilong, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    data = ['"""BABILong prompt texts: data copied verbatim from the benchmark (booydar/babilong,',
            "babilong/prompts.py, Apache-2.0), one entry per revision, named by the date of the commit it",
            "was read at. megatron_lm2/eval/prompts.py renders them; tests/test_babilong_parity.py checks the",
            "result against the benchmark's own rendering (tests/data/babilong_reference.json).",
            "Generated by tests/data/make_babilong_reference.py: regenerate, do not edit by hand.",
            '"""', "", "# flake8: noqa: E501", "",
            "SOURCE = 'https://github.com/booydar/babilong/blob/{commit}/babilong/prompts.py'", "",
            "REVISIONS = {"]
    reference = {"source": "https://github.com/booydar/babilong", "file": "babilong/prompts.py",
                 "read_at": head,
                 "how": "the benchmark's get_formatted_input(context, question, examples, instruction, post_prompt, "
                        "template=DEFAULT_TEMPLATE) at each commit; a part switched off is '' (as its runner does)",
                 "revisions": {}}
    for name, commit, note in REVISIONS:
        source = _show(args.babilong, commit, "babilong/prompts.py")
        bench = _module(source)
        data += [f"    {name!r}: {{", f"        'commit': {commit!r},", f"        'note': {note!r},",
                 f"        'template': {bench.DEFAULT_TEMPLATE!r},",
                 f"        'strip_context': {'context.strip()' in source!r},", "        'tasks': {"]
        for task in TASKS:
            texts = bench.DEFAULT_PROMPTS[task]
            data.append(f"            {task!r}: {{")
            data += [f"                {k!r}: {_literal(texts[k], 16)}," for k in ("instruction", "examples",
                                                                                  "post_prompt")]
            data.append("            },")
        data += ["        },", "    },"]
        rows = []
        for task, context, question, use_instruction, use_examples, use_post_prompt in CASES:
            texts = bench.DEFAULT_PROMPTS[task]
            prompt = bench.get_formatted_input(context, question, texts["examples"] if use_examples else "",
                                               texts["instruction"] if use_instruction else "",
                                               texts["post_prompt"] if use_post_prompt else "",
                                               template=bench.DEFAULT_TEMPLATE)
            rows.append({"task": task, "context": context, "question": question, "use_instruction": use_instruction,
                         "use_examples": use_examples, "use_post_prompt": use_post_prompt, "prompt": prompt})
        reference["revisions"][name] = {"commit": commit, "prompts": rows}
    data.append("}")
    metrics = _module(_show(args.babilong, head, "babilong/metrics.py"))
    cases = []
    for task, labels, target, output, question in ANSWER_CASES:
        labels = labels or metrics.TASK_LABELS[task]
        cases.append({"task": task, "labels": labels, "target": target, "output": output, "question": question,
                      "correct": metrics.compare_answers(target, output, question, labels)})
    saved = _saved_triples(args.babilong, head)
    step = max(1, len(saved) // SAVED_SAMPLE)
    for task, target, output, question in saved[::step][:SAVED_SAMPLE]:
        labels = metrics.TASK_LABELS[task]
        cases.append({"task": task, "labels": labels, "target": target, "output": output, "question": question,
                      "correct": metrics.compare_answers(target, output, question, labels)})
    (ROOT / "tests" / "data" / "babilong_answer_cases.json").write_text(json.dumps(
        {"source": "https://github.com/booydar/babilong", "file": "babilong/metrics.py", "commit": head,
         "how": "compare_answers(target, output, question, labels) of the benchmark's own code; the cases after "
                f"the hand-made ones are every k-th of the {len(saved)} unique triples in its babilong_evals/",
         "cases": cases}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (ROOT / "megatron_lm2" / "eval" / "babilong_prompt_texts.py").write_text("\n".join(data) + "\n", encoding="utf-8")
    (ROOT / "tests" / "data" / "babilong_reference.json").write_text(
        json.dumps(reference, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
