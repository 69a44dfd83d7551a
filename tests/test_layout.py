"""The shape of the package (issue 12, docs/architecture.md): files a person reads in one sitting, short functions,
and imports that point down the layers (math <- trainers <- recipes / CLI), never back up."""

import ast
import pathlib


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "wmss_trl"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
# the math: pure functions of tensors, importing no trainer, recipe or CLI
MATH = ("core", "mixing.py", "advantages.py", "selection.py", "entropy.py", "diagnostics.py", "evaluation.py")
BELOW_TRAINERS = (*MATH, "rollouts")  # rollouts/: the GRPO trainer reads the pool, never the reverse
TRAINERS = ("sft", "dpo", "grpo")
UPPER = ("recipes", "cli")


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imported(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> set[str]:
    """The top-level wmss_trl subpackages / modules ``path`` (under the package folder ``root``) imports, relative or
    absolute, e.g. ``{"grpo"}``."""
    package = path.relative_to(root).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                names = [parts] if parts else [[alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "wmss_trl":
                names = [node.module.split(".")[1:]]
            else:
                continue
            found.update(n[0] for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("wmss_trl."))
    return found


def test_no_long_files_or_functions():
    long = []
    for path in _modules():
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            long.append(f"{path.relative_to(PACKAGE)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"over {MAX_FILE_LINES} lines per file / {MAX_FUNCTION_LINES} per function: {long}"


def test_imports_point_down_the_layers():
    def top(path):
        return path.relative_to(PACKAGE).parts[0].removesuffix(".py")

    wrong = []
    for path in _modules():
        layer, imported = top(path), _imported(path)
        if layer in {m.removesuffix(".py") for m in BELOW_TRAINERS}:
            wrong += [f"{path.relative_to(PACKAGE)} -> {m}" for m in imported & {*TRAINERS, *UPPER}]
        elif layer not in UPPER:
            wrong += [f"{path.relative_to(PACKAGE)} -> {m}" for m in imported & set(UPPER)]
    assert not wrong, f"imports running back up the layers (math <- trainers <- recipes / CLI): {wrong}"


def test_the_layer_check_sees_imports(tmp_path):
    """The import parser finds relative and absolute imports, also inside functions (so the test above could fail)."""
    assert {"card", "checkpoints", "grpo"} <= _imported(PACKAGE / "grpo" / "trainer.py")
    module = tmp_path / "grpo" / "x.py"
    module.parent.mkdir()
    module.write_text("from ..recipes.common import a\ndef f():\n    import wmss_trl.cli\n    from . import batch\n")
    assert _imported(module, tmp_path) == {"recipes", "cli", "grpo"}
