"""`surface --eval-corpus`: test_loss and test_acc in the same pass over the grid, resumable, and
identified by the held-out sample."""

import json

import h5py
import numpy as np
import pytest
from conftest import NEGATIVE, POSITIVE

from landscape import directions as D
from landscape import surface as S
from landscape.cli import main
from landscape.data.corpus import load_batches
from landscape.errors import UsageError
from landscape.surface import file as surface_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

XS, YS = S.parse_range("-1:1:3"), S.parse_range("-0.5:0.5:2")


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("held_out") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in POSITIVE + NEGATIVE))
    return path


@pytest.fixture
def samples(tiny_bert, tiny_corpus_file, held_out_file):
    train = load_batches(tiny_bert, str(tiny_corpus_file), max_samples=8, seq_len=16, batch_size=4)
    held_out = load_batches(tiny_bert, str(held_out_file), max_samples=8, seq_len=16, batch_size=4)
    return train, held_out


@pytest.fixture
def dir_file(tiny_bert, tmp_path):
    dirs, settings = D.make_directions(tiny_bert.model, dims=2, seed=0)
    D.save_directions(tmp_path / "d.h5", dirs, settings)
    return tmp_path / "d.h5"


def _fields(path):
    with h5py.File(path, "r") as handle:
        return {name: handle[name][()] for name in surface_file.FIELDS if name in handle}


def test_test_fields_are_the_held_out_surface_at_the_same_points(tiny_bert, samples, dir_file, tmp_path):
    train, held_out = samples
    out = tmp_path / "s.h5"
    S.compute_surface_file(out, tiny_bert.model, dir_file, train, XS, YS, progress=False, eval_batches=held_out,
                           kind=tiny_bert.kind)
    data = _fields(out)
    directions = D.load_directions(dir_file)[0]
    for prefix, batches in (("train", train), ("test", held_out)):
        loss, acc = S.evaluate(tiny_bert.model, directions, batches, XS, YS, return_accuracy=True, kind=tiny_bert.kind)
        np.testing.assert_array_equal(data[f"{prefix}_loss"], loss)
        np.testing.assert_array_equal(data[f"{prefix}_acc"], acc)
    assert not np.array_equal(data["train_loss"], data["test_loss"])  # another sample, other numbers
    vmapped = tmp_path / "v.h5"
    S.compute_surface_file(vmapped, tiny_bert.model, dir_file, train, XS, YS, progress=False, eval_batches=held_out,
                           points_per_pass=4, kind=tiny_bert.kind)
    for name, values in _fields(vmapped).items():
        np.testing.assert_allclose(values, data[name], rtol=1e-5, err_msg=name)


def test_test_fields_resume_and_the_held_out_sample_is_part_of_the_identity(tiny_bert, samples, dir_file, tmp_path):
    train, held_out = samples
    out = tmp_path / "s.h5"
    S.compute_surface_file(out, tiny_bert.model, dir_file, train, XS, YS, progress=False, eval_batches=held_out,
                           kind=tiny_bert.kind)
    whole = _fields(out)
    with h5py.File(out, "r+") as handle:  # forget two held-out points (an edit drops the checksums)
        handle["test_loss"][0, 1:3] = np.nan
        del handle.attrs["checksums"]
    again = S.compute_surface_file(out, tiny_bert.model, dir_file, train, XS, YS, progress=False,
                                   eval_batches=held_out, kind=tiny_bert.kind)
    assert again["computed"] == 2
    for name, values in _fields(out).items():
        np.testing.assert_array_equal(values, whole[name], err_msg=name)
    # the same samples in another order: same counts, another fingerprint
    with pytest.raises(UsageError, match="eval_sample_fingerprint"):
        S.compute_surface_file(out, tiny_bert.model, dir_file, train, XS, YS, progress=False,
                               eval_batches=held_out[::-1], kind=tiny_bert.kind)
    with pytest.raises(UsageError, match="held-out sample .* changed"):
        S.compute_surface_file(out, tiny_bert.model, dir_file, train, XS, YS, progress=False,
                               eval_batches=held_out[:1], kind=tiny_bert.kind)
    with pytest.raises(UsageError, match="other settings"):  # a surface without test fields is another surface
        S.compute_surface_file(out, tiny_bert.model, dir_file, train, XS, YS, progress=False, kind=tiny_bert.kind)


def test_the_journal_keeps_test_fields_of_an_interrupted_run(tiny_bert, samples, dir_file, tmp_path):
    train, held_out = samples
    out = tmp_path / "s.h5"
    identity = surface_file.surface_identity(D.load_directions(dir_file)[1], train, tiny_bert.model, XS, None,
                                             eval_batches=held_out, kind=tiny_bert.kind)
    first = surface_file.SurfaceFile(out, XS, None, identity, {}, fields=surface_file.FIELDS, flush_seconds=1e9)
    first.record([(0, 2.5, 0.25, 3.5, 0.125), (2, float("nan"), 0.0, 4.0, 0.5)])
    # killed here: no flush, no close; the journal alone holds the points (each append is fsynced)
    resumed = surface_file.SurfaceFile(out, XS, None, identity, {}, fields=surface_file.FIELDS)
    assert resumed.missing() == [1]
    assert resumed.data["test_loss"][0] == 3.5 and resumed.data["test_acc"][2] == 0.5
    assert resumed.loss[2] == np.inf  # a diverged loss is +inf, never NaN, in the test fields too
    resumed.close(complete=False)


def test_cli_writes_test_fields_and_plot_and_compare_draw_them(tiny_bert_dir, tiny_corpus_file, held_out_file,
                                                               dir_file, tmp_path, capsys):
    out = tmp_path / "s.h5"
    args = ["surface", "--model", tiny_bert_dir, "--directions", dir_file, "--corpus", tiny_corpus_file,
            "--eval-corpus", held_out_file, "--max-samples", "8", "--seq-len", "16", "--batch-size", "4",
            "--x", "-1:1:3", "--y", "-1:1:2", "--out", out]
    assert main([str(a) for a in args]) == 0
    data = _fields(out)
    assert data["test_loss"].shape == data["test_acc"].shape == data["train_loss"].shape == (2, 3)
    assert np.isfinite(data["test_loss"]).all() and ((data["test_acc"] >= 0) & (data["test_acc"] <= 1)).all()
    with h5py.File(out, "r") as handle:
        assert handle.attrs["eval_corpus"] == str(held_out_file) and len(handle.attrs["eval_sample_fingerprint"]) == 16
    assert main(["plot", str(out), "--field", "test_loss", "--kind", "contour", "--out", str(tmp_path / "t.png")]) == 0
    assert main(["compare", str(out), str(out), "--field", "test_acc", "--kind", "heatmap",
                 "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 1000 and (tmp_path / "c.png").stat().st_size > 1000
    capsys.readouterr()
    assert main([str(a) for a in args[:-2] + ["--eval-corpus", tmp_path / "missing.txt", "--out", out]]) == 2
    assert capsys.readouterr().err.count("\n") == 1
