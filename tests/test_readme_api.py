"""The README's "Python API" section is code a user pastes: every block runs as written.

Each block runs in a fresh interpreter namespace, in order, in one empty folder (later blocks may
read the files earlier ones wrote, as a reader following the section would), on the embedded model.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import sys
for number, block in enumerate(sys.argv[1:], 1):
    try:
        exec(compile(block, f"README Python API block {number}", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"block {number} failed", file=sys.stderr)
        raise
"""


def api_blocks():
    """The python code blocks of the README's "Python API" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "the README has no '## Python API' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def test_the_python_api_section_shows_every_stage():
    code = "\n".join(api_blocks())
    for call in ("run_fisher", "run_stability", "run_profile", "run_schedule", "run_surface",
                 "run_finetune", "run_hessian", "make_directions", "plot(", "compare(", "compute_fisher",
                 "evaluate", "guided_dropout", "load_schedule("):
        assert call in code, f"the README's Python API does not show {call}"


# The packages of the stages (docs/api.md): a README block imports from these or from `landscape` itself.
STAGE_PACKAGES = {"data", "fisher", "surface", "curvature", "plots", "guided"}


def test_the_python_api_section_imports_only_the_public_namespace_and_stage_packages():
    import landscape

    wrong = []
    for number, block in enumerate(api_blocks(), 1):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module == "landscape":
                wrong += [f"block {number}: from landscape import {alias.name}" for alias in node.names
                          if alias.name not in landscape.__all__ and alias.name not in STAGE_PACKAGES]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                wrong += [f"block {number}: {module}" for module in modules
                          if module.split(".")[0] == "landscape" and module.split(".")[1:2] != []
                          and module.split(".")[1] not in STAGE_PACKAGES]
    assert not wrong, f"the README imports what is neither in landscape.__all__ nor a stage package: {wrong}"


@pytest.mark.slow
def test_every_python_api_block_runs_as_written(tmp_path):
    blocks = api_blocks()
    assert len(blocks) >= 2
    done = subprocess.run([sys.executable, "-c", RUNNER, *blocks], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_api_document_runs_as_written(tmp_path):
    """docs/api.md's blocks: the settings round trip and the scripted pipeline on one loaded model."""
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 2
    done = subprocess.run([sys.executable, "-c", RUNNER, *blocks], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"F.safetensors", "schedule.json", "top5.h5", "top5_s.h5", "profile"} <= {p.name for p in tmp_path.iterdir()}
