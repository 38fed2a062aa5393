"""The input readers live in megatron_lm2/data/readers.py (below both preprocess/ and
tokenizer/, which read their inputs with them). These names stay importable from here so the
preprocess modules keep their imports; new code imports megatron_lm2.data.readers."""

from megatron_lm2.data.readers import (  # noqa: F401  (re-exported: the preprocess modules' names)
    InputError,
    InputFile,
    Task,
    _check_text,
    discover_inputs,
    iter_tasks,
    json_text,
    read_task_texts,
    task_lines,
)
