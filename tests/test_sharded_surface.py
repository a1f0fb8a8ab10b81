"""Directions and surfaces of a model sharded with FSDP2 (``--shard-size``) under torchrun, on CPU
with gloo: the same files and numbers as one process, and a killed sharded surface resumes."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import cli_in_process
from conftest import landscape_cmd as _landscape
from conftest import subprocess_env as _env

from landscape import surface as S

GRID = ("--x=-1:1:4", "--y=-1:1:3")
SAMPLE = ("--max-samples", "4", "--seq-len", "16", "--batch-size", "2")
pytestmark = pytest.mark.distributed  # every test here starts torchrun


def _run(*args, ranks=1):
    done = subprocess.run(_landscape(*args, ranks=ranks), env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _attrs(path):
    import h5py

    with h5py.File(path, "r") as handle:
        return dict(handle.attrs)


def _in_process(capfd, *args):
    """One process's run in this one, on one thread as the ranks are (OMP_NUM_THREADS=1): the reference
    the sharded run must equal, without the seconds a fresh interpreter takes to import torch."""
    code, _, err = cli_in_process(capfd, *args, "--threads", "1")
    assert code == 0, err[-3000:]


@pytest.mark.parametrize("model", ["tiny_bert_dir", "tiny_gpt2_dir", "tiny_llama_dir"])
def test_sharded_directions_and_surface_equal_one_process(model, request, tiny_corpus_file, tmp_path, capfd):
    folder = request.getfixturevalue(model)
    fisher = tmp_path / "F.safetensors"
    _in_process(capfd, "fisher", "--model", folder, "--corpus", tiny_corpus_file, *SAMPLE, "--out", fisher, "--quiet")
    masked = ("directions", "--model", folder, "--fisher", fisher, "--subset", "top:10", "--orthogonalize")
    _in_process(capfd, *masked, "--out", tmp_path / "one.h5")
    _run(*masked, "--out", tmp_path / "sharded.h5", "--shard-size", "2", ranks=2)
    assert _attrs(tmp_path / "one.h5")["fingerprint"] == _attrs(tmp_path / "sharded.h5")["fingerprint"]

    surface = ("surface", "--model", folder, "--directions", tmp_path / "one.h5", "--corpus", tiny_corpus_file,
               *SAMPLE, *GRID, "--device", "cpu")
    _in_process(capfd, *surface, "--out", tmp_path / "s1.h5")
    done = _run(*surface, "--out", tmp_path / "s2.h5", "--shard-size", "2", ranks=2)
    assert done.stdout.count("wrote ") == 1  # one writer
    one, sharded = S.read_surface(tmp_path / "s1.h5"), S.read_surface(tmp_path / "s2.h5")
    assert np.isfinite(one.z).all()
    np.testing.assert_allclose(sharded.z, one.z, rtol=1e-6, atol=0)
    assert sharded.settings["shard_size"] == 2 and sharded.settings["world_size"] == 2


def test_shard_size_must_divide_the_ranks(tiny_bert_dir, tmp_path):
    done = subprocess.run(_landscape("directions", "--model", tiny_bert_dir, "--out", tmp_path / "d.h5",
                                     "--shard-size", "3", ranks=2), env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode != 0 and "does not divide the 2 ranks" in done.stderr
    assert not (tmp_path / "d.h5").exists()


def _records(out):
    path = S.journal_path(out)
    return max(0, path.read_text().count("\n") - 1) if path.exists() else 0


def test_a_killed_sharded_surface_resumes_to_the_same_numbers(tiny_llama_dir, tiny_corpus_file, tmp_path, capfd):
    _in_process(capfd, "directions", "--model", tiny_llama_dir, "--out", tmp_path / "d.h5")
    surface = ("surface", "--model", tiny_llama_dir, "--directions", tmp_path / "d.h5", "--corpus",
               tiny_corpus_file, *SAMPLE, "--x=-1:1:8", "--y=-1:1:6", "--device", "cpu", "--flush-seconds", "0")
    out = tmp_path / "s.h5"
    proc = subprocess.Popen(_landscape(*surface, "--out", out, "--shard-size", "2", ranks=2), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while _records(out) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
    proc.wait()
    seen = _records(out)
    assert 5 <= seen < 48, "the run ended before it could be killed"
    resumed = _run(*surface, "--out", out, "--shard-size", "2", ranks=2)
    assert "48 in the grid" in resumed.stdout
    assert int(resumed.stdout.split("wrote ")[1].split(": ")[1].split(" ")[0]) <= 48 - seen
    _in_process(capfd, *surface, "--out", tmp_path / "one.h5")
    np.testing.assert_allclose(S.read_surface(out).z, S.read_surface(tmp_path / "one.h5").z, rtol=1e-6, atol=0)
    assert not S.journal_path(out).exists()
