"""One command, one call (issue 21): `directions` (every kind), `hessian`, `plot` and `compare` are
each one library call, and that call gives the same file and numbers as the command line.

Everything runs in-process on the tiny GPT-2 of conftest (4 samples x 16 tokens).
"""

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from landscape import curvature, plots
from landscape.cli import main
from landscape.curvature.report import save_report
from landscape.direction_kinds import DirectionsResult, make
from landscape.errors import UsageError
from landscape.models import load_model
from landscape.outputs import identify
from landscape.settings import DirectionsSettings, HessianSettings, ModelSpec, SampleSpec

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAMPLE = ("--max-samples", 4, "--seq-len", 16, "--batch-size", 4)
SAMPLE_KW = dict(max_samples=4, seq_len=16, batch_size=4)


def cli(*args):
    return main([str(a) for a in args])


def _h5(path):
    """({attribute: value}, {dataset path: array}) of an HDF5 file."""
    data = {}
    with h5py.File(path, "r") as handle:
        attrs = dict(handle.attrs)
        handle.visititems(lambda name, item: data.update({name: item[()]}) if isinstance(item, h5py.Dataset)
                          else None)
    return attrs, data


def assert_same_h5(a, b):
    (attrs_a, data_a), (attrs_b, data_b) = _h5(a), _h5(b)
    assert sorted(attrs_a) == sorted(attrs_b)
    for key in attrs_a:
        assert np.array_equal(np.asarray(attrs_a[key]), np.asarray(attrs_b[key])), key
    assert sorted(data_a) == sorted(data_b) and data_a
    for name in data_a:
        assert np.array_equal(data_a[name], data_b[name]), name


@pytest.fixture(scope="module")
def fisher_file(tiny_gpt2_dir, tiny_corpus_file, tmp_path_factory):
    """A Fisher file of the tiny GPT-2, made in Python (the command line reads it like its own)."""
    from landscape.data.corpus import load_batches
    from landscape.fisher import compute_fisher, save_fisher

    loaded = load_model(str(tiny_gpt2_dir))
    scores = compute_fisher(loaded.model, load_batches(loaded, str(tiny_corpus_file), **SAMPLE_KW), kind=loaded.kind)
    return save_fisher(tmp_path_factory.mktemp("fisher") / "F.safetensors", scores)


@pytest.fixture(scope="module")
def checkpoints(tiny_gpt2_dir, tmp_path_factory):
    """Four perturbed copies of the tiny GPT-2, as a short training trajectory."""
    folder = tmp_path_factory.mktemp("trajectory")
    paths = []
    for i in range(4):
        loaded = load_model(str(tiny_gpt2_dir))
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(0.01 * (4 - i) * torch.randn(p.shape, generator=gen))
        loaded.model.save_pretrained(folder / f"step{i}")
        loaded.tokenizer.save_pretrained(folder / f"step{i}")
        paths.append(folder / f"step{i}")
    return paths


# ----------------------------------------------------------------------------- directions, every kind
def test_random_directions_plain_and_fisher_masked(tiny_gpt2_dir, fisher_file, tmp_path):
    assert cli("directions", "--model", tiny_gpt2_dir, "--seed", 3, "--orthogonalize", "--out", tmp_path / "c.h5") == 0
    made = make(DirectionsSettings(ModelSpec(str(tiny_gpt2_dir)), seed=3, orthogonal=True), out=tmp_path / "p.h5")
    assert_same_h5(tmp_path / "c.h5", tmp_path / "p.h5")
    attrs = made.attributes
    assert isinstance(made, DirectionsResult) and made.computed == made.total == 2 and made.path.name == "p.h5"
    assert attrs["fingerprint"] == _h5(tmp_path / "p.h5")[0]["fingerprint"] and attrs["model_fingerprint"]
    assert made.fingerprints == {"model_fingerprint": attrs["model_fingerprint"]}
    assert cli("directions", "--model", tiny_gpt2_dir, "--fisher", fisher_file, "--subset", "top:10", "--dims", 1,
               "--out", tmp_path / "cm.h5") == 0
    one = make(DirectionsSettings(ModelSpec(str(tiny_gpt2_dir)), fisher=fisher_file, subset="top:10", dims=1),
               out=tmp_path / "pm.h5")
    assert_same_h5(tmp_path / "cm.h5", tmp_path / "pm.h5")
    masked = one.attributes
    assert one.computed == one.total == 1
    assert masked["subset"] == "top:10" and 0 < masked["n_selected"] < masked["n_parameters"]


def test_hessian_directions(tiny_gpt2_dir, tiny_corpus_file, fisher_file, tmp_path):
    assert cli("directions", "--kind", "hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE,
               "--fisher", fisher_file, "--subset", "top:50", "--device", "cpu", "--out", tmp_path / "c.h5") == 0
    settings = DirectionsSettings(ModelSpec(str(tiny_gpt2_dir), device="cpu"), kind="hessian", fisher=fisher_file,
                                  subset="top:50", sample=SampleSpec(str(tiny_corpus_file), **SAMPLE_KW))
    made = make(settings, out=tmp_path / "p.h5")
    assert_same_h5(tmp_path / "c.h5", tmp_path / "p.h5")
    attrs = made.attributes
    assert attrs["kind"] == "hessian" and len(attrs["eigenvalues"]) == 2 and attrs["sample_fingerprint"]
    assert made.fingerprints["sample_fingerprint"] == attrs["sample_fingerprint"] and made.computed == 2


def test_interpolation_and_trajectory_directions(checkpoints, tmp_path):
    a, b = checkpoints[0], checkpoints[-1]
    assert cli("directions", "--model", a, "--to", b, "--out", tmp_path / "c.h5") == 0
    made = make(DirectionsSettings(ModelSpec(str(a)), to=b), out=tmp_path / "p.h5")
    assert_same_h5(tmp_path / "c.h5", tmp_path / "p.h5")
    attrs = made.attributes
    assert attrs["kind"] == "interpolation" and attrs["distance"] > 0 and attrs["to_fingerprint"]
    assert made.settings.kind == "interpolation" and made.computed == made.total == 1
    assert cli("directions", "--trajectory", *checkpoints, "--out", tmp_path / "ct.h5") == 0
    plane = make(DirectionsSettings(checkpoints=checkpoints), out=tmp_path / "pt.h5").attributes
    assert_same_h5(tmp_path / "ct.h5", tmp_path / "pt.h5")
    assert plane["trajectory_coordinates"].shape == (4, 2) and list(plane["trajectory_labels"])[-1] == "step3"


def test_library_refusals_speak_library_terms(tiny_gpt2_dir, checkpoints, tmp_path):
    for call, words in ((lambda: DirectionsSettings(subset="top:5"), "Fisher"),
                        (lambda: DirectionsSettings(to="B", norm="layer"), "norm does not apply"),
                        (lambda: DirectionsSettings(kind="eigen"), "kind must be one of"),
                        (lambda: make(DirectionsSettings(checkpoints=checkpoints[:3]), out=tmp_path / "d.h5"),
                         "at least 4"),
                        (lambda: make("random", out=tmp_path / "d.h5"), "DirectionsSettings"),
                        (lambda: HessianSettings(ModelSpec(str(tiny_gpt2_dir)), top=0), "nothing to compute"),
                        (lambda: HessianSettings(ModelSpec(str(tiny_gpt2_dir)), tol=2.0), "tol"),
                        (lambda: curvature.run_hessian(HessianSettings(ModelSpec(str(tiny_gpt2_dir))),
                                                       out=tmp_path / "h.txt"), r"\.json"),
                        (lambda: make(DirectionsSettings(), out=tmp_path / "d.txt"), r"\.h5")):
        with pytest.raises(UsageError, match=words) as refused:
            call()
        assert "--" not in str(refused.value)
    assert not list(tmp_path.iterdir())  # refused before anything was written, locks included


# ----------------------------------------------------------------------------- hessian
def _hessian_settings(model_dir, corpus):
    """The settings of the command line below (``SAMPLE``), as a Python user writes them."""
    return HessianSettings(ModelSpec(str(model_dir), device="cpu"), SampleSpec(str(corpus), **SAMPLE_KW), top=1,
                           trace=3, spectrum=1, steps=5, bins=10)


@pytest.fixture(scope="module")
def reports(tiny_gpt2_dir, tiny_corpus_file, tmp_path_factory):
    """The same Hessian run from the command line and from Python: (cli report, python report, folder)."""
    folder = tmp_path_factory.mktemp("hessian")
    assert cli("hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--top", 1, "--trace", 3,
               "--spectrum", 1, "--steps", 5, "--bins", 10, "--device", "cpu", "--vectors", folder / "cv.h5",
               "--out", folder / "c.json", "--quiet") == 0
    result = curvature.run_hessian(_hessian_settings(tiny_gpt2_dir, tiny_corpus_file), out=folder / "p.json",
                                   vectors=folder / "pv.h5")
    assert result.computed == result.total == 5 and result.path == folder / "p.json"
    assert result.vectors == folder / "pv.h5"
    return json.loads((folder / "c.json").read_text()), json.loads((folder / "p.json").read_text()), folder


def test_hessian_report(reports, tiny_gpt2_dir, tiny_corpus_file):
    by_cli, by_python, folder = reports
    assert by_python["settings"].pop("vectors").endswith("pv.h5") and by_cli["settings"].pop("vectors")
    for key in ("settings", "provenance", "loss", "eigenvalues", "eigenpairs", "trace", "spectrum"):
        assert by_cli[key] == by_python[key], key
    assert_same_h5(folder / "cv.h5", folder / "pv.h5")
    again = curvature.run_hessian(_hessian_settings(tiny_gpt2_dir, tiny_corpus_file), out=folder / "p.json",
                                  vectors=folder / "pv.h5")
    assert not again.computed and again.report["eigenvalues"] == by_python["eigenvalues"]


# ----------------------------------------------------------------------------- plot and compare
def test_plot_surface_and_spectrum(write_surface, reports, tmp_path):
    surface = write_surface("s.h5", lambda x, y: 1 + x**2 + 2 * y**2, y=np.linspace(-1, 1, 11))
    assert cli("plot", surface, "--kind", "contour", "--out", tmp_path / "c.png") == 0
    drawn = plots.plot(surface, tmp_path / "p.png", kind="contour")
    assert drawn == {"path": tmp_path / "p.png", "kind": "contour", "trajectory": False}
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "p.png").read_bytes()
    spectrum = plots.plot(reports[2] / "p.json", tmp_path / "spectrum.html", kind="spectrum", log=True)
    assert identify(spectrum["path"]).kind == "figure"
    with pytest.raises(UsageError, match="another figure"):  # its claim protects it as the command's does
        plots.plot(surface, tmp_path / "spectrum.html")


def test_compare_with_hessian_columns(reports, tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    folder = reports[2]
    surfaces = []
    for name in ("a", "b"):  # 1D surfaces of the tiny model along the eigenvector, from the command line
        surfaces.append(tmp_path / f"{name}.h5")
        assert cli("surface", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--directions",
                   folder / "pv.h5", "--x", f"-{0.01 if name == 'a' else 0.02}:0.01:3", "--out", surfaces[-1]) == 0
    hessian = [folder / "c.json", folder / "p.json"]
    assert cli("compare", *surfaces, "--labels", "a,b", "--hessian", ",".join(map(str, hessian)),
               "--out", tmp_path / "c.png") == 0
    rows = plots.compare(surfaces, tmp_path / "p.png", labels=["a", "b"], hessian=hessian)
    by_cli, by_python = (tmp_path / "c.sharpness.csv").read_text(), (tmp_path / "p.sharpness.csv").read_text()
    assert by_cli == by_python
    table = list(csv.DictReader(by_python.splitlines()))
    assert [float(r["top_eigenvalue"]) for r in table] == [reports[1]["eigenvalues"][0]] * 2
    assert rows[0]["trace"] == reports[1]["trace"]["mean"] and "curvature" in table[0]
    other = dict(reports[1], settings=dict(reports[1]["settings"], model_fingerprint="0123456789abcdef"))
    save_report(tmp_path / "other.json", other)
    with pytest.raises(UsageError, match="another model"):
        plots.compare(surfaces, tmp_path / "p.png", hessian=[folder / "p.json", tmp_path / "other.json"])
    with pytest.raises(UsageError, match="one `landscape hessian` JSON per surface"):
        plots.compare(surfaces, tmp_path / "p.png", hessian=[folder / "p.json"])
