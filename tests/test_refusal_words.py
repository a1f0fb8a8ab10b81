"""Refusals that name the real problem (issue 28): a refusal that points at the wrong option or says
"cannot be read" about a good file sends the user the wrong way.

* ``surface --directions X --out X``: both settings name one file; it once said "choose another
  --directions", as if the direction file were wrong.
* a resume that adds ``--eval-corpus`` to a surface computed without one: it once said the file
  "cannot be read as a surface file ('test_loss')"; it is a good file of other settings.
"""

import hashlib

import h5py
import pytest
from conftest import cli_in_process as _cli
from conftest import one_line as _one_line

from landscape.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def dir_file(tiny_bert_dir, tmp_path):
    from landscape import directions as D
    from landscape.models import load_model

    dirs, settings = D.make_directions(load_model(str(tiny_bert_dir)).model, dims=2, seed=0)
    path = tmp_path / "X.h5"
    D.save_directions(path, dirs, settings)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_out_and_directions_naming_one_file_are_refused_naming_both(tiny_bert_dir, tiny_corpus_file, dir_file,
                                                                     tmp_path, capfd):
    from landscape.settings import ModelSpec, SurfaceSettings
    from landscape.surface import run_surface

    before = _digest(dir_file)
    (tmp_path / "link.h5").symlink_to(dir_file)
    for out, extra in ((dir_file, []), (dir_file, ["--overwrite"]), (tmp_path / "link.h5", [])):
        code, _, err = _cli(capfd, "surface", "--model", tiny_bert_dir, "--directions", dir_file, "--corpus",
                            tiny_corpus_file, "--max-samples", 2, "--seq-len", 16, "--x", "-1:1:3", "--y", "-1:1:3",
                            "--out", out, *extra)
        line = _one_line(code, err, "--out '", "--directions '", "are the same file; give each its own")
        assert "choose another --directions" not in line
    settings = SurfaceSettings(dir_file, ModelSpec(str(tiny_bert_dir)))
    with pytest.raises(UsageError, match="^out '.*' and directions '.*' are the same file"):
        run_surface(settings, out=dir_file, overwrite=True)
    assert _digest(dir_file) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.h5", "link.h5"]


def test_a_resume_that_adds_a_held_out_corpus_says_so_and_how_out(tiny_bert_dir, tiny_corpus_file, dir_file,
                                                                   tmp_path, capfd):
    out = tmp_path / "s.h5"
    args = ["surface", "--model", tiny_bert_dir, "--directions", dir_file, "--corpus", tiny_corpus_file,
            "--max-samples", 2, "--seq-len", 16, "--x", "-1:1:3", "--y", "-1:1:2", "--out", out]
    code, _, err = _cli(capfd, *args)
    assert code == 0, err
    before = _digest(out)
    code, _, err = _cli(capfd, *args, "--eval-corpus", tiny_corpus_file)
    line = _one_line(code, err, "computed without a held-out corpus", "--overwrite", "another --out")
    assert "cannot be read" not in line
    assert _digest(out) == before
    code, _, err = _cli(capfd, *args, "--eval-corpus", tiny_corpus_file, "--overwrite")  # the way out works
    assert code == 0, err
    with h5py.File(out, "r") as handle:
        assert "test_loss" in handle
