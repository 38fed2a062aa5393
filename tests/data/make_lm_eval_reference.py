"""Regenerate tests/data/lm_eval_mmlu_reference.json from lm-evaluation-harness's own task files.

    python tests/data/make_lm_eval_reference.py --lm-eval GIT_DIR   (a clone of EleutherAI/lm-evaluation-harness)

Keeps, for two subjects, the `mmlu` (letters) and `mmlu_continuation` (cloze) task configs as
lm-eval resolves them (the subject yaml over its template yaml), the delimiters lm-eval's
TaskConfig defaults to, and the lines of lm_eval/api/task.py that define acc / acc_norm /
acc_bytes, with the commit. tests/test_babilong_parity.py renders the Jinja fields of the
config itself (they are `{{question.strip()}}`-style lookups) and compares with mmlu.py.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ("anatomy", "high_school_biology")
FORMATS = {"letters": "default", "cloze": "continuation"}


def _show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], capture_output=True,
                          text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval", required=True, help="git dir of an EleutherAI/lm-evaluation-harness clone")
    args = parser.parse_args()
    commit = subprocess.run(["git", "--git-dir", args.lm_eval, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    tasks = {}
    for fmt, folder in FORMATS.items():
        for subject in SUBJECTS:
            config = yaml.safe_load(_show(args.lm_eval, commit, f"lm_eval/tasks/mmlu/{folder}/mmlu_{subject}.yaml"))
            base = yaml.safe_load(_show(args.lm_eval, commit, f"lm_eval/tasks/mmlu/{folder}/{config.pop('include')}"))
            base.update(config)
            tasks[f"{fmt}/{subject}"] = {k: base[k] for k in ("description", "doc_to_text", "doc_to_choice",
                                                               "doc_to_target", "fewshot_split", "fewshot_config")}
    task_py = _show(args.lm_eval, commit, "lm_eval/api/task.py").splitlines()
    metric_lines = [line.strip() for line in task_py
                    if any(k in line for k in ("completion_len =", "byte_length =", "pred = np.argmax",
                                               "pred_norm = np.argmax", "pred_byte = np.argmax"))]
    config_py = _show(args.lm_eval, commit, "lm_eval/config/task.py").splitlines()
    delimiters = [line.strip() for line in config_py if line.strip().startswith(("target_delimiter: str = ",
                                                                                 "fewshot_delimiter: str = "))]
    values = {line.split(":")[0]: ast.literal_eval(line.split(" = ", 1)[1]) for line in delimiters}
    out = {"source": "https://github.com/EleutherAI/lm-evaluation-harness", "commit": commit, "tasks": tasks,
           "delimiters": {"target": values["target_delimiter"], "fewshot": values["fewshot_delimiter"]},
           "delimiter_lines": delimiters,
           "metric_lines": metric_lines,
           "default_metrics": "multiple_choice: acc, acc_norm (lm_eval/api/registry.py DEFAULT_METRIC_REGISTRY)"}
    (ROOT / "tests" / "data" / "lm_eval_mmlu_reference.json").write_text(json.dumps(out, indent=1) + "\n",
                                                                          encoding="utf-8")


if __name__ == "__main__":
    main()
