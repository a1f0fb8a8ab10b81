"""Code a reader takes in one pass: no module over 450 lines and no function over 80, unless the
module's docstring says why (a line starting "Size:")."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "landscape"
MAX_LINES, MAX_FUNCTION = 450, 80


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        yield path.relative_to(PACKAGE.parent), source, ast.parse(source)


def _reason(tree) -> bool:
    doc = ast.get_docstring(tree) or ""
    return any(line.strip().startswith("Size:") for line in doc.splitlines())


def test_no_module_is_longer_than_450_lines_without_a_stated_reason():
    long = [f"{path} ({source.count(chr(10))} lines)" for path, source, tree in _modules()
            if source.count("\n") > MAX_LINES and not _reason(tree)]
    assert not long, f"over {MAX_LINES} lines without a 'Size:' line in the docstring: {long}"


def test_no_function_is_longer_than_80_lines_without_a_stated_reason():
    def length(node):
        return node.end_lineno - node.lineno + 1

    long = [f"{path}:{node.name} ({length(node)} lines)" for path, _, tree in _modules() if not _reason(tree)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length(node) > MAX_FUNCTION]
    assert not long, f"functions over {MAX_FUNCTION} lines: {long}"
