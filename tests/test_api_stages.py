"""One command, one call: each stage's Python function writes the same file, with the same numbers
and provenance, as its subcommand (fisher, stability, profile, schedule, surface, finetune).

Tiny models, in-process (``cli.main``), one torch thread so that numbers compare bit for bit.
"""

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from conftest import write_toy_tsv

from landscape import cli
from landscape.errors import UsageError
from landscape.settings import (
    FisherSettings,
    GridSpec,
    ModelSpec,
    ProfileSettings,
    SampleSpec,
    ScheduleSettings,
    StabilitySettings,
    SurfaceSettings,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = {"max_samples": 4, "seq_len": 16, "batch_size": 2}
SAMPLE_FLAGS = ["--max-samples", "4", "--seq-len", "16", "--batch-size", "2"]


def _cli(*args):
    assert cli.main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def fisher_file(tiny_bert_dir, tiny_corpus_file, tmp_path_factory):
    """A Fisher file written by ``landscape fisher``."""
    out = tmp_path_factory.mktemp("fisher") / "F.safetensors"
    _cli("fisher", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, *SAMPLE_FLAGS, "--quiet", "--out", out)
    return out


def test_fisher_call_writes_the_file_of_the_command(fisher_file, tiny_bert_dir, tiny_corpus_file, tmp_path):
    from landscape.fisher import load_fisher, run_fisher

    settings = FisherSettings(model=ModelSpec(str(tiny_bert_dir)), sample=SampleSpec(str(tiny_corpus_file), **SAMPLE))
    result = run_fisher(settings, out=tmp_path / "F.safetensors", progress=False)
    (ours, ours_meta), (theirs, theirs_meta) = load_fisher(result.path), load_fisher(fisher_file)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ours_meta == theirs_meta and ours_meta["model_fingerprint"] and ours_meta["sample_fingerprint"]
    assert result.samples == result.computed == result.total == 4 and result.tensors == len(ours)
    assert result.settings == settings and result.fingerprints["model_fingerprint"] == ours_meta["model_fingerprint"]
    assert result.parameters == sum(t.numel() for t in ours.values())
    assert not list(tmp_path.glob("*.ckpt"))


def test_stability_call_writes_the_table_of_the_command(tiny_bert_dir, tiny_corpus_file, tmp_path):
    from landscape.fisher import run_stability

    _cli("stability", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, *SAMPLE_FLAGS, "--fractions", "0.5",
         "--top", "10,50", "--quiet", "--out", tmp_path / "cli.csv")
    settings = StabilitySettings(ModelSpec(str(tiny_bert_dir)), SampleSpec(str(tiny_corpus_file), **SAMPLE),
                                 fractions=[0.5], top="10,50")
    result = run_stability(settings, out=tmp_path / "api.csv", progress=False)
    assert (tmp_path / "api.csv").read_bytes() == (tmp_path / "cli.csv").read_bytes()
    assert [row["fraction"] for row in result.rows] == [1.0, 0.5] and result.samples == 4


@pytest.mark.slow
def test_profile_call_writes_the_files_of_the_command(fisher_file, tiny_bert_dir, tmp_path):
    from landscape.guided.profile import PROFILE_FILES, run_profile

    _cli("profile", fisher_file, "--model", tiny_bert_dir, "--out", tmp_path / "cli")
    result = run_profile(ProfileSettings(fisher_file, ModelSpec(str(tiny_bert_dir))), out=tmp_path / "api")
    assert {p.name for p in map(type(tmp_path), result.files.values())} == set(PROFILE_FILES)
    for name in PROFILE_FILES:
        if name.endswith(".csv"):
            assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_schedule_call_writes_the_json_of_the_command(fisher_file, tiny_bert_dir, tmp_path):
    from landscape import run_schedule

    _cli("schedule", fisher_file, "--model", tiny_bert_dir, "--p-upper", "0.2", "--shape", "power", "--gamma", "3",
         "--out", tmp_path / "cli.json")
    settings = ScheduleSettings(fisher_file, ModelSpec(str(tiny_bert_dir)), p_upper=0.2, shape="power", gamma=3)
    made = run_schedule(settings, out=tmp_path / "api.json")
    assert json.loads((tmp_path / "api.json").read_text()) == json.loads((tmp_path / "cli.json").read_text())
    assert made.schedule.model_fingerprint and made.schedule.p_upper == 0.2 and made.settings == settings


def test_surface_call_writes_the_grid_of_the_command(tiny_bert_dir, tiny_corpus_file, tmp_path):
    from landscape.surface import run_surface

    directions = tmp_path / "d.h5"
    _cli("directions", "--model", tiny_bert_dir, "--dims", "2", "--out", directions)
    grid = ["--x", "-1:1:3", "--y", "-0.5:0.5:2"]
    _cli("surface", "--model", tiny_bert_dir, "--corpus", tiny_corpus_file, "--directions", directions,
         *SAMPLE_FLAGS, *grid, "--out", tmp_path / "cli.h5")
    settings = SurfaceSettings(directions, ModelSpec(str(tiny_bert_dir)), SampleSpec(str(tiny_corpus_file), **SAMPLE),
                               GridSpec(x="-1:1:3", y="-0.5:0.5:2"))
    result = run_surface(settings, out=tmp_path / "api.h5", progress=False)
    assert result.computed == result.total == 6
    with h5py.File(tmp_path / "api.h5", "r") as ours, h5py.File(tmp_path / "cli.h5", "r") as theirs:
        for name in ("xcoordinates", "ycoordinates", "train_loss", "train_acc"):
            np.testing.assert_array_equal(ours[name][()], theirs[name][()])
        assert ours.attrs["identity"] == theirs.attrs["identity"]
        assert json.loads(ours.attrs["identity"])["model_fingerprint"]


def test_finetune_call_writes_the_summary_of_the_command(tiny_bert_dir, tmp_path, monkeypatch):
    from landscape.guided import sweep
    from landscape.guided.finetune import FinetuneResult, run_finetune
    from landscape.results import StageResult
    from landscape.settings import FinetuneSettings

    data = write_toy_tsv(tmp_path / "toy.tsv", 24)
    model = dict(model=str(tiny_bert_dir), device="cpu", threads="2")
    options = dict(dataset=str(data), regularizer="none,dropout", fractions="1", restarts=1, epochs=1, batch_size=8,
                   seq_len=16, lr=1e-3)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**model, **options}.items()]
    threads, train = [], sweep.finetune_once

    def spy(*args, **kwargs):  # the stage applies its own thread count, as the command does
        threads.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(sweep, "finetune_once", spy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # an explicit count is not capped
    _cli("finetune", *flags, "--out", tmp_path / "cli.csv")
    settings = FinetuneSettings(ModelSpec(model["model"], device="cpu", threads="2"), **options)
    result = run_finetune(settings, out=str(tmp_path / "api.csv"), log=None)
    assert threads == [2] * 4 and torch.get_num_threads() == 1  # and restored after

    def table(path):
        return list(csv.DictReader(open(path)))

    assert table(tmp_path / "api.csv") == table(tmp_path / "cli.csv") == [
        {k: str(v) for k, v in row.items()} for row in table(result.path)]
    assert isinstance(result, FinetuneResult) and isinstance(result, StageResult) and result.settings is settings
    assert (result.computed, result.total, len(result.rows)) == (2, 2, 2)
    assert result.plot.exists() and result.runs_out.name == "api_runs.csv"
    assert result.fingerprints["model_fingerprint"].startswith("v2:")
    again = run_finetune(settings, out=str(tmp_path / "api.csv"), log=None)  # resumed: nothing trained
    assert (again.computed, again.total) == (0, 2) and again.rows == result.rows and len(threads) == 4


def test_stages_refuse_in_library_terms(tiny_bert_dir, tiny_corpus_file, fisher_file, tmp_path):
    from landscape import run_schedule
    from landscape.fisher import run_fisher
    from landscape.surface import run_surface

    with pytest.raises(UsageError, match="batch_size") as refused:
        run_fisher(FisherSettings(ModelSpec(str(tiny_bert_dir)), SampleSpec(batch_size=0)),
                   out=tmp_path / "F.safetensors")
    with pytest.raises(UsageError, match="gamma"):
        run_schedule(ScheduleSettings(fisher_file, ModelSpec(str(tiny_bert_dir)), gamma=float("nan")),
                              out=tmp_path / "s.json")
    with pytest.raises(UsageError, match="^x must have MIN smaller than MAX"):
        run_surface(SurfaceSettings(tmp_path / "d.h5", grid=GridSpec(x="1:-1:3")), out=tmp_path / "s.h5")
    assert "--" not in str(refused.value) and not list(tmp_path.iterdir())
    from landscape.errors import OutputUnwritable
    from landscape.guided.finetune import run_finetune
    from landscape.settings import FinetuneSettings

    with pytest.raises(OutputUnwritable, match="^plot 'x.txt': use a .png") as unwritable:
        run_finetune(FinetuneSettings(), out=str(tmp_path / "sum.csv"), plot="x.txt")
    assert unwritable.value.what == "plot" and not list(tmp_path.iterdir())
