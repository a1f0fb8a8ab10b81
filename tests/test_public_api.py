"""One public namespace (docs/api.md): the names users need are reached from ``landscape`` (its
``__all__``) or from their stage package, and no module exists only to re-export them.

``landscape.corpus``, ``.directions``, ``.schedule`` and ``.regularizers`` are names of the namespace
(PEP 562 ``__getattr__``), not modules: ``from landscape import directions`` gives
``landscape.surface.directions``, ``import landscape.directions`` fails.
"""

import ast
import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import subprocess_env

import landscape

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "landscape"
SHORT_NAMES = {"corpus": "landscape.data.corpus", "directions": "landscape.surface.directions",
               "schedule": "landscape.guided.schedule", "regularizers": "landscape.guided.regularizers"}


def test_every_name_in_all_resolves():
    missing = []
    for name in landscape.__all__:
        try:
            getattr(landscape, name)
        except (AttributeError, ImportError) as error:
            missing.append(f"{name}: {error}")
    assert not missing, missing
    assert len(set(landscape.__all__)) == len(landscape.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        landscape.nothing_here  # noqa: B018
    with pytest.raises(ImportError):
        from landscape import nothing_here  # noqa: F401


@pytest.mark.parametrize("name", sorted(SHORT_NAMES))
def test_short_names_are_the_stage_modules(name):
    from importlib import import_module

    namespace = {}
    exec(f"from landscape import {name}", namespace)
    assert namespace[name] is import_module(SHORT_NAMES[name])


def test_the_names_scripts_use_are_there():
    from landscape import corpus, directions, fisher, models, regularizers, schedule, surface  # noqa: F401

    for module, names in ((corpus, ["load_batches"]), (directions, ["random_direction", "fisher_mask", "apply_mask"]),
                          (schedule, ["guided_dropout", "apply"]), (regularizers, ["use_mixout"])):
        assert all(callable(getattr(module, n)) for n in names), module.__name__
    from landscape.direction_kinds import KINDS, make
    from landscape.guided.callback import callback
    assert landscape.make_directions is make and landscape.DIRECTION_KINDS is KINDS
    assert landscape.schedule_callback is callback


def test_the_old_module_paths_are_gone():
    # Without site: an editable install of another checkout adds a finder that maps landscape.*
    # to that checkout's files, which would answer for modules this one no longer has.
    probe = ("import importlib\n"
             f"for name in {sorted(SHORT_NAMES)!r}:\n"
             "    try:\n"
             "        importlib.import_module('landscape.' + name)\n"
             "    except ModuleNotFoundError as error:\n"
             "        assert error.name == 'landscape.' + name, error\n"
             "    else:\n"
             "        raise SystemExit('landscape.' + name + ' is importable')\n")
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    for name in SHORT_NAMES:
        assert not (PACKAGE / f"{name}.py").exists() and not (PACKAGE / name).exists()


def test_import_landscape_loads_no_torch():
    probe = ("import sys, landscape\n"
             "heavy = [m for m in ('torch', 'transformers', 'h5py', 'numpy') if m in sys.modules]\n"
             "assert not heavy, heavy\n"
             "landscape.__all__, dir(landscape)\n"
             "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=60)
    assert done.returncode == 0, done.stderr


def _only_imports(tree: ast.Module) -> bool:
    """Every top-level statement, docstring aside, an import or an ``__all__`` assignment."""
    body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    def plumbing(node):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        return bool(targets) and all(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)
    return bool(body) and all(plumbing(node) for node in body)


def test_no_module_only_re_exports():
    shims = [str(path.relative_to(ROOT)) for path in sorted(PACKAGE.rglob("*.py"))
             if path.name not in ("__init__.py", "__main__.py") and _only_imports(ast.parse(path.read_text()))]
    assert not shims, f"modules that only import (re-export shims): {shims}"


def test_the_shim_detector_sees_a_shim():
    shim = '"""Kept importable."""\nfrom .surface.directions import *\nfrom .x import y\n__all__ = ["y"]\n'
    assert _only_imports(ast.parse(shim))
    assert _only_imports(ast.parse("from .a import b\n__all__ += ['c']\n"))
    assert not _only_imports(ast.parse(shim + "X = 1\n"))
    assert not _only_imports(ast.parse('"""Only a docstring."""\n'))


def _functions():
    return {name: value for name in landscape.__all__
            if inspect.isfunction(value := getattr(landscape, name))}


def test_public_functions_have_complete_parameter_hints():
    functions = _functions()
    assert {"run_fisher", "make_directions", "plot", "load_fisher", "schedule_callback"} <= set(functions)
    missing = []
    for name, function in functions.items():
        hints = typing.get_type_hints(function)
        missing += [f"{name}({parameter})" for parameter in inspect.signature(function).parameters
                    if parameter not in hints]
    assert not missing, f"public functions with parameters without type hints: {missing}"


def test_the_api_document_lists_the_public_namespace():
    text = (ROOT / "docs" / "api.md").read_text()
    section = re.search(r"^## The public namespace\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "docs/api.md has no '## The public namespace' section"
    listed = set(re.findall(r"`([A-Za-z_]\w*)`", section.group(1)))
    assert not set(landscape.__all__) - listed, sorted(set(landscape.__all__) - listed)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_library_imports_name_modules_that_exist_and_skip_the_namespace():
    """Inside the package an import names a module of the package (anywhere in a body, where it only
    fails when that line runs), and never reaches a stage through ``landscape``'s namespace: the
    library imports from the stage packages.  Checked on the source, since an editable install of
    another checkout can make a removed module importable at run time."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    wrong = []
    for path in paths:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: package.count(".") + 2 - node.level]
                    base = ".".join(anchor + ([base] if base else []))
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                base, names = "", [alias.name for alias in node.names]
            else:
                continue
            targets = [base] if base else names
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {t}" for t in targets
                      if t.split(".")[0] == "landscape" and t not in modules]
            if base == "landscape":
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno} takes {n} from the namespace" for n in names
                          if n in landscape.__all__ and n != "__version__" and f"landscape.{n}" not in modules]
    assert not wrong, wrong
