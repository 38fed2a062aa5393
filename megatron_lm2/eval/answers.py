"""BABILong's answer rule (booydar/babilong, babilong/metrics.py `compare_answers`; the same, but for
whitespace, from commit d7a4fb7 of 2024-06-04 to 7a6efee of 2026-06-01), restated.

The output is lower-cased and cut to its first sentence (up to the first '.') and to what comes
before any '<context>' or '<example>' the model starts to invent. The task's labels found in it,
less the labels the question itself mentions, are the prediction. Then:

  * a target with a comma that is longer than 3 characters (qa8's "apple,milk") is split at the
    commas: correct when every part is predicted and nothing else (as many labels as parts);
  * any other target (qa19's "n,e" included, which is 3 characters) is correct when it is the
    one and only predicted label.

Quirks of the reference are kept on purpose, so scores stay comparable with published ones:
labels match as substrings ('none' also contains 'one', so qa7's "none" never scores); the cut
at 'Question' runs after lower-casing and so never fires; the parts of a multi-object target are
not stripped ("apple, milk" would look for " milk", which no label equals).
"""

from __future__ import annotations

# Closed answer vocabularies of tasks qa1-qa10 (the reference's TASK_LABELS).
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


def predicted_labels(output: str, question: str, labels) -> set[str]:
    """The labels the output names, less those the question names (never a target)."""
    return labels_in(first_sentence(output), labels) - labels_in(question, labels)


def is_multi_object(target: str) -> bool:
    """The reference's test for a target of several objects: a comma, and longer than 3
    characters (so qa19's two-letter directions like "n,e" stay single labels)."""
    return "," in target and len(target) > 3


def compare_answers(target: str, output: str, question: str, labels) -> bool:
    """The rule with the task's labels given (as the reference's compare_answers takes them)."""
    predicted = predicted_labels(output, question, labels)
    target = target.lower()
    if is_multi_object(target):
        parts = target.split(",")
        return all(part in predicted for part in parts) and len(predicted) == len(parts)
    return predicted == {target}


def is_correct(target: str, output: str, question: str, task: str) -> bool:
    return compare_answers(target, output, question, TASK_LABELS[task])
