"""`lm2-eval` on bad input: one line on stderr naming the flag, file or record, exit code 2, and no
traceback unless --debug / LM2_DEBUG=1. Each case runs the command in its own process, as a user
would; every case fails before a model is loaded, so each takes about a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GOOD = {"input": "Mary went to the kitchen.", "question": "Where is Mary?", "target": "kitchen"}


def _lm2_eval(args, cwd, debug=False):
    env = {k: v for k, v in os.environ.items() if k != "LM2_DEBUG"}
    if debug:
        env["LM2_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "megatron_lm2.eval.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _babilong(data, *extra):
    return ["babilong", "--hf", "no-model-here", "--data", str(data), "--tasks", "qa1", "--lengths", "0k", *extra]


# (name, files under data/, the command, what the one line must name)
CASES = [
    ("record not an object", {"qa1/0k.json": json.dumps([GOOD, ["Mary", "kitchen"]])},
     _babilong("data"), "qa1/0k.json, record 2: is a list, expected an object"),
    ("null target", {"qa1/0k.json": json.dumps([dict(GOOD, target=None)])},
     _babilong("data"), "qa1/0k.json, record 1: field 'target' is null, expected a string"),
    ("list target", {"qa1/0k.jsonl": json.dumps(GOOD) + "\n\n" + json.dumps(dict(GOOD, target=["a", "b"])) + "\n"},
     _babilong("data"), "qa1/0k.jsonl, line 3: field 'target' is a list, expected a string"),
    ("missing field", {"data/qa1/0k.json": json.dumps([GOOD, {"input": "x", "target": "kitchen"}])},
     _babilong("data"), "data/qa1/0k.json, record 2: lacks field(s) question"),
    ("decode error in JSON lines", {"qa1/0k.jsonl": json.dumps(GOOD) + "\n{oops\n"},
     _babilong("data"), "qa1/0k.jsonl, line 2: invalid JSON"),
    ("decode error in a JSON array", {"qa1/0k.json": "[\n" + json.dumps(GOOD) + ",\n{oops}\n]"},
     _babilong("data"), "qa1/0k.json, line 3: invalid JSON"),
    ("no data directory", {}, _babilong("nowhere"), "BABILong data directory nowhere does not exist"),
    ("no cell", {"qa1/0k.json": json.dumps([GOOD])}, _babilong("data", "--lengths", "4k"),
     "no BABILong data for task qa1 at length 4k"),
    ("unknown task", {"qa1/0k.json": json.dumps([GOOD])}, _babilong("data", "--tasks", "qa1,qa11"),
     "--tasks 'qa1,qa11': unknown qa11"),
    ("unknown prompt revision", {}, _babilong("data", "--prompt-revision", "2023"), "--prompt-revision"),
    ("bad --bos", {}, _babilong("data", "--bos", "maybe"), "--bos"),
    ("bad --prompt-parts", {}, _babilong("data", "--prompt-parts", "examples,shots"), "--prompt-parts"),
    ("no model folder", {"qa1/0k.json": json.dumps([GOOD])}, _babilong("data"),
     "--hf no-model-here: no such directory"),
    ("bad --limit", {"qa1/0k.json": json.dumps([GOOD])}, _babilong("data", "--limit", "0"), "--limit 0"),
    ("another protocol in --output", {"qa1/0k.json": json.dumps([GOOD]), "hf/config.json": '{"model_type": "lm2"}',
                                      "out/run.json": json.dumps({"prompt_revision": "2024-05-15"})},
     ["babilong", "--hf", "data/hf", "--data", "data", "--tasks", "qa1", "--lengths", "0k", "--output", "data/out"],
     "--output data/out holds results made with prompt_revision = '2024-05-15', this run has '2024-06-04'"),
    ("MMLU answer", {"test/anatomy_test.csv": "q,a,b,c,d,E\n"},
     ["mmlu", "--hf", "no-model-here", "--data", "data"], "anatomy_test.csv, line 1: answer 'E'"),
    ("MMLU no data", {}, ["mmlu", "--hf", "x", "--data", "data"], "no MMLU test data under data"),
    ("make-babilong length", {}, ["make-babilong", "--out", "gen", "--lengths", "4 kilo"], "--lengths '4 kilo'"),
    ("inspect model", {}, ["inspect", "--megatron", "nowhere", "--text", "hi", "--out", "o"],
     "--megatron nowhere: no such checkpoint directory"),
    ("inspect text file", {}, ["inspect", "--megatron", "data", "--text-file", "story.txt", "--out", "o"],
     "story.txt"),
]


@pytest.mark.parametrize("name, files, args, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, name, files, args, names):
    (tmp_path / "data").mkdir()
    for rel, text in files.items():
        _write(tmp_path / "data", rel, text)
    result = _lm2_eval(args, tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("lm2-eval"), result.stderr
    assert names in lines[0], lines[0]


def test_debug_shows_the_traceback(tmp_path):
    _write(tmp_path / "data", "qa1/0k.json", json.dumps([dict(GOOD, target=None)]))
    for result in (_lm2_eval(_babilong("data", "--debug"), tmp_path),
                   _lm2_eval(_babilong("data"), tmp_path, debug=True)):
        assert result.returncode != 0 and "Traceback" in result.stderr
        assert "record 1: field 'target' is null" in result.stderr


def test_a_damaged_result_file_names_itself_on_resume(tmp_path):
    """A cell file in --output that is not this harness's (or was cut short by hand)."""
    from megatron_lm2.eval.babilong import run_babilong
    from megatron_lm2.eval.babilong_data import DataError

    out = tmp_path / "out"
    out.mkdir()
    (out / "qa1_0k.jsonl").write_text('{"correct": true}\n{"correct": tr\n')
    with pytest.raises(DataError, match=r"qa1_0k.jsonl, line 2: not a result row"):
        run_babilong(lambda p: "x", "unused", ["qa1"], ["0k"], str(out), progress=False,
                     loader=lambda *a: [GOOD])
