"""The package's import graph: every module imports on its own in a fresh interpreter, and no
two modules import each other, directly or around a loop, counting imports inside functions
(a lazy import only hides a cycle until the day someone moves it to the top)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_lm2"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Project modules `name` imports anywhere in its file ("from a.b import c" counts a.b.c
    when that is a module, else a.b); relative imports resolved against the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done, cycles = set(), []

    def visit(node, stack):
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    # The graph is not empty by accident: the trainer imports the checkpoint module.
    assert "megatron_lm2.training.checkpoint" in graph["megatron_lm2.training.trainer"]


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in _modules() if not n.endswith("__main__")]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_compat_and_tokenizer_import_nothing_above_them():
    """Layering (issue 33): compat.py and tokenizer/ sit below training/ and preprocess/, which
    import them; an import the other way is an upward arrow, even one hidden inside a function."""
    modules = _modules()
    above = ("megatron_lm2.training", "megatron_lm2.preprocess")
    lower = [n for n in modules if n == "megatron_lm2.compat" or n.startswith("megatron_lm2.tokenizer")]
    assert "megatron_lm2.tokenizer.train" in lower
    upward = {n: sorted(m for m in _imports(n, modules[n], modules)
                        if any(m == a or m.startswith(a + ".") for a in above)) for n in lower}
    assert not any(upward.values()), f"upward imports: { {n: m for n, m in upward.items() if m} }"
    # The check sees lazy imports: tokenizer/train.py reads its inputs with data/readers inside a function.
    assert "megatron_lm2.data.readers" in _imports("megatron_lm2.tokenizer.train", modules["megatron_lm2.tokenizer.train"], modules)
    assert "megatron_lm2.child_process" in _imports("megatron_lm2.compat", modules["megatron_lm2.compat"], modules)
