"""BABILong prompts for qa1-qa10, rendered as the benchmark renders them.

The texts (instruction, in-context examples, post-prompt, template) are data, kept verbatim per
revision of the benchmark's babilong/prompts.py in babilong_prompt_texts.py, with the commit they
were read at. The default revision is the benchmark's current one; "2024-05-15" is its first
draft (single newlines, unstripped context, typos), kept to compare with runs that used it.

    build_prompt(task, context, question, revision=DEFAULT_REVISION)  ->  the model input
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.eval.babilong_prompt_texts import REVISIONS, SOURCE

DEFAULT_REVISION = "2024-06-04"
PROMPT_REVISIONS = tuple(REVISIONS)
PROMPT_PARTS = ("instruction", "examples", "post_prompt")  # all on: the benchmark runner's full config


def parse_prompt_parts(text: str) -> tuple[str, ...]:
    """--prompt-parts: a comma list of PROMPT_PARTS, or 'none' (the bare context and question)."""
    if text.strip() == "none":
        return ()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PROMPT_PARTS]
    if unknown or not parts:
        raise UserInputError(f"--prompt-parts {text!r}: expected a comma list of {', '.join(PROMPT_PARTS)}, "
                             f"or none")
    return tuple(p for p in PROMPT_PARTS if p in parts)


@dataclass(frozen=True)
class TaskPrompt:
    instruction: str
    examples: str
    post_prompt: str


def _revision(revision: str) -> dict:
    if revision not in REVISIONS:
        raise UserInputError(f"--prompt-revision {revision!r}: known revisions are {', '.join(REVISIONS)}")
    return REVISIONS[revision]


def task_prompt(task: str, revision: str = DEFAULT_REVISION) -> TaskPrompt:
    tasks = _revision(revision)["tasks"]
    if task not in tasks:
        raise UserInputError(f"no BABILong prompt for task {task!r}; known: {', '.join(tasks)}")
    return TaskPrompt(**tasks[task])


def revision_source(revision: str = DEFAULT_REVISION) -> str:
    """Where the texts of a revision come from (a URL at the commit)."""
    return SOURCE.format(commit=_revision(revision)["commit"])


def build_prompt(task: str, context: str, question: str, use_instruction: bool = True,
                 use_examples: bool = True, use_post_prompt: bool = True,
                 revision: str = DEFAULT_REVISION) -> str:
    """The benchmark's input for one sample: its template filled with the task's texts (a part
    switched off is empty, as the benchmark's runner passes it), the context stripped where that
    revision strips it, and the whole stripped."""
    spec = _revision(revision)
    p = task_prompt(task, revision)
    return spec["template"].format(
        instruction=p.instruction if use_instruction else "",
        examples=p.examples if use_examples else "",
        post_prompt=p.post_prompt if use_post_prompt else "",
        context=context.strip() if spec["strip_context"] else context,
        question=question,
    ).strip()
