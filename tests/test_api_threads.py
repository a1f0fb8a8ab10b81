"""The stage calls follow the commands' thread policy (issue 30, item 2): ``ModelSpec.threads`` is
``auto`` by default, as ``--threads`` is, and on a busy machine the Python call and the command write
the same file bit for bit.

Both run in their own process without OMP_NUM_THREADS (so ``auto`` decides, not a cap), beside one
busy-looping process per usable core (niced, so that the test stays short; ``auto`` counts nice
time): ``auto`` then picks one thread however busy the rest of the machine is, the command and the
call alike.  Before issue 30 the call ran torch's default threads
and its Fisher differed from the command's in the last bits.
"""

import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import landscape_cmd, subprocess_env

from landscape import make_directions, runtime
from landscape.settings import (
    DirectionsSettings,
    FisherSettings,
    HessianSettings,
    ModelSpec,
    ProfileSettings,
    ScheduleSettings,
    StabilitySettings,
    SurfaceSettings,
)

SAMPLE = dict(max_samples=8, seq_len=16, batch_size=4)
FLAGS = ["--max-samples", "8", "--seq-len", "16", "--batch-size", "4"]

API = """
import sys
from landscape import FisherSettings, GridSpec, ModelSpec, SampleSpec, SurfaceSettings, run_fisher, run_surface
model, corpus, directions, fisher_out, surface_out = sys.argv[1:6]
sample = SampleSpec(corpus, max_samples=8, seq_len=16, batch_size=4)
run_fisher(FisherSettings(model=ModelSpec(model), sample=sample), out=fisher_out, progress=False)
run_surface(SurfaceSettings(directions, model=ModelSpec(model), sample=sample,
                            grid=GridSpec(x="-1:1:5", y="-1:1:5")), out=surface_out, progress=False)
"""


@pytest.mark.parametrize("cls", [FisherSettings, StabilitySettings, SurfaceSettings, HessianSettings,
                                 ScheduleSettings])
def test_every_stage_runs_threads_auto_by_default(cls):
    fields = {"directions": "d.h5"} if cls is SurfaceSettings else {"fisher": "F.safetensors"} \
        if cls is ScheduleSettings else {}
    assert cls(**fields).model.threads == "auto"


def test_the_profile_runs_threads_auto_by_default():
    assert ProfileSettings("F.safetensors").model.threads == "auto"


@pytest.mark.slow
def test_the_call_and_the_command_write_the_same_files_on_a_busy_machine(tiny_bert_dir, tiny_corpus_file, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS=None)
    directions = tmp_path / "d.h5"
    make_directions(DirectionsSettings(ModelSpec(str(tiny_bert_dir), threads="1")), out=directions, progress=False)
    # Niced: the machine's cores are busy (auto counts nice time) while the two runs keep most of them.
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
                for _ in runtime.usable_cores()]
    try:
        time.sleep(1.0)  # the spinners are running before either run measures the machine
        common = ["--model", tiny_bert_dir, "--corpus", tiny_corpus_file, *FLAGS, "--quiet"]
        for args in (["fisher", *common, "--out", tmp_path / "cli_F.safetensors"],
                     ["surface", "--directions", directions, *common, "--x=-1:1:5", "--y=-1:1:5",
                      "--out", tmp_path / "cli_s.h5"]):
            subprocess.run(landscape_cmd(*args), env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)
        subprocess.run([sys.executable, "-c", API, str(tiny_bert_dir), str(tiny_corpus_file), str(directions),
                        str(tmp_path / "api_F.safetensors"), str(tmp_path / "api_s.h5")],
                       env=env, check=True, timeout=600)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    from landscape.fisher import load_fisher

    (cli_f, cli_meta), (api_f, api_meta) = load_fisher(tmp_path / "cli_F.safetensors"), \
        load_fisher(tmp_path / "api_F.safetensors")
    assert cli_f.keys() == api_f.keys() and all(torch.equal(cli_f[k], api_f[k]) for k in cli_f)
    assert cli_meta == api_meta
    with h5py.File(tmp_path / "cli_s.h5", "r") as ours, h5py.File(tmp_path / "api_s.h5", "r") as theirs:
        for name in ("xcoordinates", "ycoordinates", "train_loss", "train_acc"):
            assert np.array_equal(ours[name][()], theirs[name][()]), name
        assert not np.isnan(ours["train_loss"][()]).any()
