"""The command line of curvature and paths: `landscape hessian`, `directions --kind hessian | --to |
--trajectory`, `plot --kind spectrum`, trajectory points on contours, `compare --hessian`.

Everything runs in-process on the tiny GPT-2 of conftest (37k parameters, 4 samples x 16 tokens).
"""

import csv
import json
import math

import h5py
import numpy as np
import pytest
import torch
from conftest import kill_when

from landscape import curvature
from landscape.cli import main
from landscape.curvature.report import FORMAT, save_report
from landscape.data.corpus import load_batches
from landscape.fisher import load_fisher
from landscape.models import load_model
from landscape.surface import loss_and_accuracy, read_surface
from landscape.surface.directions import fisher_mask, load_directions, perturbable_names

SAMPLE = ("--max-samples", 4, "--seq-len", 16, "--batch-size", 4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def cli(*args):
    return main([str(a) for a in args])


def one_line_error(capsys, *args, needle=""):
    capsys.readouterr()
    try:
        code = cli(*args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    return err[0]


def hessian(model_dir, corpus, out, *extra):
    return cli("hessian", "--model", model_dir, "--corpus", corpus, *SAMPLE, "--out", out, "--quiet", *extra)


@pytest.fixture(scope="module")
def fisher_file(tiny_gpt2_dir, tiny_corpus_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("fisher") / "F.safetensors"
    assert cli("fisher", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--out", path,
               "--quiet") == 0
    return path


def _batches(model_dir, corpus):
    loaded = load_model(str(model_dir))
    return loaded, load_batches(loaded, str(corpus), max_samples=4, seq_len=16, batch_size=4)


# ----------------------------------------------------------------------------- landscape hessian
@pytest.mark.slow
def test_hessian_writes_report_and_vectors_that_surface_reads(tiny_gpt2_dir, tiny_corpus_file, tmp_path, capsys):
    out, vectors = tmp_path / "H.json", tmp_path / "V.h5"
    assert hessian(tiny_gpt2_dir, tiny_corpus_file, out, "--top", 2, "--trace", 5, "--spectrum", 1, "--steps", 6,
                   "--bins", 20, "--vectors", vectors) == 0
    report = json.loads(out.read_text())
    assert report["format"] == FORMAT and len(report["eigenvalues"]) == 2
    assert report["eigenvalues"][0] >= report["eigenvalues"][1] and report["eigenpairs"]["converged"]
    assert report["trace"]["samples"] == 5 and math.isfinite(report["trace"]["stderr"])
    assert len(report["spectrum"]["density"]) == 20
    assert report["settings"]["subset"] == "all" and report["settings"]["ignore"] == "biasbn"
    assert report["provenance"]["sample_fingerprint"] and "bos=auto" in report["settings"]["framing"]
    assert not list(tmp_path.glob("*.ckpt"))  # checkpoints go once the report is written
    dirs, attrs = load_directions(vectors)
    assert len(dirs) == 2 and attrs["kind"] == "hessian"
    np.testing.assert_allclose(attrs["eigenvalues"], report["eigenvalues"])
    for d in dirs:
        assert float(sum(t.double().pow(2).sum() for t in d.values())) == pytest.approx(1.0, abs=1e-4)
        assert all(not t.any() for name, t in d.items() if t.dim() < 2)  # ignore=biasbn
    # `surface` reads the eigenvectors like any other direction file; along v1 the loss curves by λ1
    # (near 0: a unit step is large for a random tiny model, whose loss is far from quadratic at 0.05).
    h = 0.01
    surface_out = tmp_path / "S.h5"
    assert cli("surface", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--directions", vectors,
               "--one-d", "--x", f"{-h}:{h}:3", "--out", surface_out) == 0
    z = read_surface(surface_out).z
    assert z[1] == pytest.approx(report["loss"], rel=1e-6)
    assert (z[0] + z[2] - 2 * z[1]) / h**2 == pytest.approx(report["eigenvalues"][0], rel=0.05)
    # Rerunning the finished command does nothing; other settings are refused in one line.
    capsys.readouterr()
    assert hessian(tiny_gpt2_dir, tiny_corpus_file, out, "--top", 2, "--trace", 5, "--spectrum", 1, "--steps", 6,
                   "--bins", 20, "--vectors", vectors) == 0
    assert "nothing to do" in capsys.readouterr().out
    one_line_error(capsys, "hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--out", out,
                   "--top", 1, needle="--overwrite")
    # The density as a figure, static and interactive.
    for name in ("spectrum.png", "spectrum.html"):
        assert cli("plot", out, "--kind", "spectrum", "--log", "--out", tmp_path / name) == 0
        assert (tmp_path / name).stat().st_size > 1000


def test_masked_eigenvectors_are_zero_outside_the_mask(tiny_gpt2_dir, tiny_corpus_file, fisher_file, tmp_path):
    out, vectors = tmp_path / "H.json", tmp_path / "V.h5"
    assert hessian(tiny_gpt2_dir, tiny_corpus_file, out, "--fisher", fisher_file, "--subset", "top:10", "--top", 2,
                   "--vectors", vectors) == 0
    loaded = load_model(str(tiny_gpt2_dir))
    scores, _ = load_fisher(fisher_file)
    mask = fisher_mask(scores, "top:10", names=perturbable_names(loaded.model))
    report = json.loads(out.read_text())
    assert report["provenance"]["n_coordinates"] == sum(int(m.sum()) for m in mask.values())
    dirs, attrs = load_directions(vectors)
    assert attrs["subset"] == "top:10" and attrs["n_selected"] == report["provenance"]["n_coordinates"]
    for d in dirs:
        assert all(not d[name][~mask[name]].any() for name in d)
    # `directions --kind hessian` gives the same axes (same sample, mask and seed).
    d_out = tmp_path / "D.h5"
    assert cli("directions", "--kind", "hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE,
               "--fisher", fisher_file, "--subset", "top:10", "--dims", 2, "--out", d_out) == 0
    axes, axes_attrs = load_directions(d_out)
    np.testing.assert_allclose(axes_attrs["eigenvalues"], report["eigenvalues"], rtol=1e-6)
    for a, b in zip(axes, dirs):
        for name in a:
            assert not a[name][~mask[name]].any()
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_interrupted_trace_resumes_to_the_same_value(tiny_gpt2_dir, tiny_corpus_file, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole.json"
    assert hessian(tiny_gpt2_dir, tiny_corpus_file, whole, "--top", 0, "--trace", 6) == 0
    out = tmp_path / "H.json"
    real, calls = curvature.HessianOperator.quadratic, {"n": 0}  # a probe's zᵀHz

    def killed(self, v):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(self, v)

    monkeypatch.setattr(curvature.HessianOperator, "quadratic", killed)
    assert hessian(tiny_gpt2_dir, tiny_corpus_file, out, "--top", 0, "--trace", 6) == 130
    monkeypatch.setattr(curvature.HessianOperator, "quadratic", real)
    journal = tmp_path / "H.json.trace.ckpt"
    assert not out.exists() and len(journal.read_text().splitlines()) == 1 + 4
    # Other settings are refused while the checkpoint is there: --seed also draws another sample, named first.
    one_line_error(capsys, "hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--out", out,
                   "--quiet", "--top", 0, "--trace", 6, "--seed", 3, needle="the sample changed")
    assert hessian(tiny_gpt2_dir, tiny_corpus_file, out, "--top", 0, "--trace", 6) == 0
    assert json.loads(out.read_text())["trace"] == json.loads(whole.read_text())["trace"]
    assert not journal.exists()


def test_a_resumed_hessian_says_what_it_resumed_from(tiny_gpt2_dir, tiny_corpus_file, tmp_path, monkeypatch,
                                                     capsys):
    # Issue 30 (item 6): each journal a rerun starts from is named with how much of it was done,
    # as Fisher and surface say it; --quiet says nothing.
    from landscape.curvature import checkpoint

    out, real = tmp_path / "H.json", checkpoint._Journal.add

    def stop_at(journal, records):
        def add(self, index, **values):
            real(self, index, **values)
            if self.path.name.endswith(journal) and len(self.records) >= records:
                raise KeyboardInterrupt
        monkeypatch.setattr(checkpoint._Journal, "add", add)

    args = ("hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--out", out,
            "--top", 1, "--trace", 6, "--spectrum", 2, "--steps", 4, "--bins", 8)
    stop_at(".trace.ckpt", 2)
    assert cli(*args, "--quiet") == 130
    capsys.readouterr()
    stop_at(".spectrum.ckpt", 1)
    assert cli(*args, "--quiet") == 130  # resumed quietly: not a line about it
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("resuming")] == []
    monkeypatch.setattr(checkpoint._Journal, "add", real)
    assert cli(*args) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resuming")]
    assert said == [f"resuming from '{out}.top.ckpt': 1 of 1 eigenpairs done",
                    f"resuming from '{out}.trace.ckpt': 6 of 6 probes done",
                    f"resuming from '{out}.spectrum.ckpt': 1 of 2 runs done"]


@pytest.mark.slow  # a real kill of a real run: about 5-20 s
def test_a_killed_overwrite_keeps_the_finished_report_and_vectors(tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    # The report and its eigenvectors are one result: a replacement killed after the new vectors
    # were written (during the trace) once left the old report beside the new vectors.
    import os
    import subprocess
    import sys
    from pathlib import Path

    from landscape.curvature.report import direction_fingerprint

    out, vectors = tmp_path / "H.json", tmp_path / "V.h5"
    assert hessian(tiny_gpt2_dir, tiny_corpus_file, out, "--top", 1, "--vectors", vectors) == 0
    finished = {p: p.read_bytes() for p in (out, vectors)}
    again = ["hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--out", out, "--quiet",
             "--top", 1, "--vectors", vectors, "--seed", 1, "--overwrite", "--trace"]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "landscape.cli", *map(str, again), "100000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trace = tmp_path / "H.json.trace.ckpt"
    kill_when(proc, 3, trace)  # top done, the trace under way
    assert (tmp_path / ".V.h5.new.h5").exists()  # the new vectors, aside
    assert {p: p.read_bytes() for p in finished} == finished
    assert cli(*again, 4) == 0  # the replacement resumes and moves into place whole
    report = json.loads(out.read_text())
    assert report["settings"]["seed"] == 1 and report["vectors"]["path"] == str(vectors)
    assert report["vectors"]["fingerprint"] == direction_fingerprint(vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["H.json", "V.h5"]


# ----------------------------------------------------------------------------- paths between checkpoints
def _perturbed_copy(model_dir, path, seed, scale=0.02):
    loaded = load_model(str(model_dir))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def test_to_direction_surface_gives_a_at_0_and_b_at_1(tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    model_b = _perturbed_copy(tiny_gpt2_dir, tmp_path / "B", seed=1)
    d_out, s_out = tmp_path / "D.h5", tmp_path / "S.h5"
    assert cli("directions", "--model", tiny_gpt2_dir, "--to", model_b, "--out", d_out) == 0
    dirs, attrs = load_directions(d_out)
    assert len(dirs) == 1 and attrs["kind"] == "interpolation"
    assert cli("surface", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--directions", d_out,
               "--x", "0:1:2", "--out", s_out) == 0
    z = read_surface(s_out).z
    for x, folder in ((0, tiny_gpt2_dir), (1, model_b)):
        loaded, batches = _batches(folder, tiny_corpus_file)
        assert z[x] == pytest.approx(loss_and_accuracy(loaded.model, batches, loaded.kind)[0], rel=1e-5)


def test_trajectory_plane_attributes_and_contour_with_points(tiny_gpt2_dir, tiny_corpus_file, tmp_path, capsys):
    ckpts = [_perturbed_copy(tiny_gpt2_dir, tmp_path / f"step{i}", seed=10 + i, scale=0.01 * (4 - i))
             for i in range(4)]
    d_out, s_out = tmp_path / "T.h5", tmp_path / "S.h5"
    assert cli("directions", "--trajectory", *ckpts, "--out", d_out) == 0
    with h5py.File(d_out, "r") as handle:
        explained = handle.attrs["explained_variance"]
        coords = handle.attrs["trajectory_coordinates"]
        labels = [v.decode() if isinstance(v, bytes) else v for v in handle.attrs["trajectory_labels"]]
    assert len(explained) == 2 and 0 < explained.sum() <= 1 + 1e-9
    assert coords.shape == (4, 2) and tuple(coords[-1]) == (0.0, 0.0)
    assert labels == ["step0", "step1", "step2", "step3"]
    assert cli("surface", "--model", ckpts[-1], "--corpus", tiny_corpus_file, *SAMPLE, "--directions", d_out,
               "--x", "-1:1:3", "--y", "-1:1:3", "--out", s_out) == 0
    for name in ("contour.png", "contour.html"):
        capsys.readouterr()
        assert cli("plot", s_out, "--kind", "contour", "--out", tmp_path / name) == 0
        assert "trajectory" in capsys.readouterr().out and (tmp_path / name).stat().st_size > 1000
    # The plane is centred on the last checkpoint: another --model is refused.
    one_line_error(capsys, "directions", "--trajectory", *ckpts, "--model", ckpts[0], "--out", tmp_path / "X.h5",
                   needle="last checkpoint")
    one_line_error(capsys, "directions", "--trajectory", *ckpts[:3], "--out", tmp_path / "X.h5", needle="at least 4")


# ----------------------------------------------------------------------------- compare and errors
def test_compare_adds_hessian_columns(write_surface, tmp_path, capsys):
    a = write_surface("a.h5", lambda x: 1 + x**2)
    b = write_surface("b.h5", lambda x: 1 + 3 * x**2)
    reports = []
    for name, top, trace in (("ha.json", 2.0, 10.0), ("hb.json", 6.0, 30.0)):
        save_report(tmp_path / name, {"format": FORMAT, "settings": {}, "provenance": {"n_coordinates": 100},
                                      "loss": 3.0, "eigenvalues": [top],
                                      "eigenpairs": {"residuals": [1e-5], "products": 20, "converged": True},
                                      "trace": {"mean": trace, "stderr": 0.5, "samples": 10}})
        reports.append(str(tmp_path / name))
    out = tmp_path / "cmp.png"
    assert cli("compare", a, b, "--labels", "a,b", "--hessian", ",".join(reports), "--out", out) == 0
    with open(tmp_path / "cmp.sharpness.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["top_eigenvalue"]) for r in rows] == [2.0, 6.0]
    assert [float(r["trace"]) for r in rows] == [10.0, 30.0] and rows[0]["trace_stderr"] == "0.5"
    assert "curvature" in rows[0]  # the surface-based numbers stay
    one_line_error(capsys, "compare", a, b, "--hessian", reports[0], "--out", out, needle="one `landscape hessian`")


def test_bad_input_is_one_line(tiny_gpt2_dir, tiny_bert_dir, tmp_path, capsys):
    one_line_error(capsys, "directions", "--kind", "eigen", "--out", tmp_path / "d.h5", needle="--kind")
    one_line_error(capsys, "directions", "--model", tiny_gpt2_dir, "--to", tiny_bert_dir, "--out", tmp_path / "d.h5",
                   needle="share no parameter names")
    one_line_error(capsys, "directions", "--corpus", "x.txt", "--out", tmp_path / "d.h5", needle="--kind hessian")
    one_line_error(capsys, "hessian", "--model", tiny_gpt2_dir, "--out", tmp_path / "h.txt", needle=".json")
    one_line_error(capsys, "hessian", "--model", tiny_gpt2_dir, "--top", 0, "--out", tmp_path / "h.json",
                   needle="nothing to compute")
    one_line_error(capsys, "hessian", "--model", tiny_gpt2_dir, "--subset", "top:5", "--out", tmp_path / "h.json",
                   needle="--fisher")
    one_line_error(capsys, "plot", tmp_path / "missing.json", "--kind", "spectrum", "--out", tmp_path / "s.png",
                   needle="does not exist")
    assert not list(tmp_path.iterdir())
