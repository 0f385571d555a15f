"""The documentation's examples run, so they cannot rot.

Convention (README.md and docs/*.md): a ```python block directly after a line
``<!-- test -->`` is run as a script of its own (a fresh `python` process, in an empty temporary
folder) and must exit 0; ``<!-- test: slow -->`` runs it only with the slow tests (`pytest -m slow`).
Unmarked blocks are illustrations and are not run. Every `lowbit ...` command in a ```bash block
must parse with the current command line (its options exist and their values are valid).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*test(:\s*slow)?\s*-->\s*$")


def blocks(path: Path, lang: str):
    """(line number, marker or None, code) of every ```lang block of ``path``."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            before = lines[start - 1].strip() if start > 0 else ""
            m = MARK.match(before)
            yield start + 1, (("slow" if m.group(1) else "test") if m else None), "\n".join(lines[start + 1 : j])
            i = j
        i += 1


def runnable():
    out = []
    for path in DOCS:
        for line, mark, code in blocks(path, "python"):
            if mark is not None:
                marks = [pytest.mark.slow] if mark == "slow" else []
                out.append(pytest.param(code, id=f"{path.name}:{line}", marks=marks))
    return out


def test_the_readme_has_runnable_examples():
    assert any(mark for _, mark, _ in blocks(ROOT / "README.md", "python")), "no <!-- test --> block in README.md"


@pytest.mark.parametrize("code", runnable())
def test_marked_example_runs(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code + "\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the example failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"


def commands():
    """Every `lowbit ...` command of the ```bash blocks, as an argument list (comments, env
    assignments and `&&` chains handled)."""
    out = []
    for path in DOCS:
        for line, _, code in blocks(path, "bash"):
            for text in code.replace("\\\n", " ").splitlines():  # join `\` continuation lines
                for part in text.split("#", 1)[0].split("&&"):
                    words = shlex.split(part)
                    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                        words = words[1:]
                    if words and words[0] == "lowbit":
                        out.append(pytest.param(words[1:], id=f"{path.name}:{line}:{' '.join(words[1:3])}"))
    return out


@pytest.mark.parametrize("argv", commands())
def test_documented_commands_parse(argv, capsys):
    from lowbit.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # --help exits 0; a bad option exits 2
        err = capsys.readouterr().err
        # files a command reads (--init model.pt) need not exist here; everything else must parse
        assert e.code == 0 or ": no such file: " in err, f"`lowbit {' '.join(argv)}` does not parse: {err}"
