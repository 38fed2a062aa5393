"""BABILong's answer rule (booydar/babilong, babilong/metrics.py), restated.

An output is correct only if, in its first sentence (lower-cased, cut at the first '.', and
before any '<context>' or '<example>' the model starts to invent), the target is the ONE
task label present once the labels that the question itself mentions are set aside.

Two quirks of the reference are kept on purpose, so scores stay comparable with published
ones: labels match as substrings ('none' also contains 'one', so qa7's "none" never scores),
and the reference's cut at 'Question' runs after lower-casing and so never fires.
"""

from __future__ import annotations

# Closed answer vocabularies of tasks qa1-qa10.
_LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": _LOCATIONS,
    "qa2": _LOCATIONS,
    "qa3": _LOCATIONS,
    "qa4": _LOCATIONS,
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
}
TASKS = tuple(TASK_LABELS)


def first_sentence(output: str) -> str:
    """The part of a generation the rule looks at."""
    text = output.lower().split(".")[0]
    for marker in ("<context>", "<example>", "Question"):  # 'Question': see the module doc
        text = text.split(marker)[0]
    return text


def labels_in(text: str, labels) -> set[str]:
    text = text.lower()
    return {label.lower() for label in labels if label.lower() in text}


def is_correct(target: str, output: str, question: str, task: str) -> bool:
    labels = TASK_LABELS[task]
    predicted = labels_in(first_sentence(output), labels) - labels_in(question, labels)
    return predicted == {target.lower()}
