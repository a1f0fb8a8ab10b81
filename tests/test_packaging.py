"""The package as users install it: a wheel carries the embedded model and works from any folder."""

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import landscape_cmd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the installed setuptools builds it, with no download.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(out)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1:]}")
    return Path(glob.glob(str(out / "landscape-*.whl"))[0])


@pytest.mark.slow
def test_wheel_holds_the_embedded_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert f"landscape/data/model/{member}" in names
    assert not any(n.startswith(("tests/", "data/", "benchmarks/")) for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    code = ("import landscape, sys; from landscape.models import load_model; "
            "loaded = load_model(None); print(landscape.__file__); print(loaded.kind)")
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    where, kind = run.stdout.split()
    assert where.startswith(str(target)) and kind == "mlm"
    # A whole stage through the installed console entry point, from that folder.
    fisher = subprocess.run(landscape_cmd("fisher", "--max-samples", "2", "--seq-len", "16", "--quiet", "--out",
                                          "F.safetensors"), cwd=elsewhere, env=env, capture_output=True,
                            text=True)
    assert fisher.returncode == 0, fisher.stderr
    assert (elsewhere / "F.safetensors").exists()
    # `where` from the wheel: no data/build_checkpoints.py beside it, so it says where to get the script.
    env["LANDSCAPE_DATA"] = str(tmp_path / "home")
    where = subprocess.run(landscape_cmd("where"), cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    assert "python data/build_checkpoints.py" not in where.stdout and "wheel does not carry" in where.stdout
