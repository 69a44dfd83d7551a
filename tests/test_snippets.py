"""Every ```python block of README.md and docs/*.md runs as written (issue 15, item 2).

Each block runs alone in a fresh interpreter, in an empty temporary folder, on a CPU, with one thread. A block that is
not meant to run must not be fenced as Python (shell commands go in ```bash blocks).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_FENCES = ("python", "py", "python3")
FENCE = re.compile(r"^```[ \t]*(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TIMEOUT = 300  # seconds per block; each takes ~10-25 s (most of it importing torch / transformers / TRL)


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line of the opening fence, language, code)`` of every fenced block at the start of a line in ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def python_blocks():
    return [
        pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}")
        for path in DOCS
        for line, lang, code in fenced_blocks(path)
        if lang in PYTHON_FENCES
    ]


def test_extraction_finds_the_blocks(tmp_path):
    """The extractor sees every block (fences included), with its line: checked on a file written here."""
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n\n```bash\nls\n```\n```py\ny = 2\n\nz = 3\n```\n")
    assert fenced_blocks(doc) == [(3, "python", "x = 1\n"), (9, "bash", "ls\n"), (12, "py", "y = 2\n\nz = 3\n")]
    found = {p.values[0].name for p in python_blocks()}
    assert {"README.md", "dpo.md", "grpo.md"} <= found  # the quickstart and the trainer docs have snippets


def run_block(where: str, code: str, folder: Path, timeout: float = TIMEOUT) -> str | None:
    """Run ``code`` as a script in ``folder`` in a fresh interpreter; None when it exits with 0, else why not."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    script = folder / "snippet.py"
    script.write_text(code, encoding="utf-8")
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"the ```python block at {where} did not finish in {timeout} s"
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        return f"the ```python block at {where} failed (exit code {proc.returncode}):\n{tail}"
    return None


def test_a_failing_block_is_reported_with_its_place(tmp_path):
    code = "import os\nassert os.listdir('.') == ['snippet.py']\nraise SystemExit('boom')\n"  # runs in an empty folder
    assert run_block("doc.md:7", code, tmp_path) == "the ```python block at doc.md:7 failed (exit code 1):\nboom"
    assert run_block("doc.md:9", "print('ok')\n", tmp_path) is None
    assert "did not finish in 0.5 s" in run_block("doc.md:11", "import time\ntime.sleep(30)\n", tmp_path, 0.5)


@pytest.mark.parametrize("path, line, code", python_blocks())
def test_snippet_runs_as_written(path, line, code, tmp_path):
    failure = run_block(f"{path.relative_to(ROOT)}:{line}", code, tmp_path)
    if failure:
        pytest.fail(failure, pytrace=False)
