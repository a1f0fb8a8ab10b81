"""Loss surfaces: grid evaluation, weight restoration, resumable files, SIGKILL, torchrun."""

import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import landscape_cmd
from conftest import subprocess_env as _env

from landscape import directions as D
from landscape import surface as S
from landscape.data.corpus import load_batches
from landscape.data.objectives import sequence_losses
from landscape.errors import UsageError
from landscape.journal import JsonLines
from landscape.surface import file as surface_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def bert_batches(tiny_bert, tiny_corpus_file):
    return load_batches(tiny_bert, str(tiny_corpus_file), max_samples=12, seq_len=16, batch_size=5)


@pytest.fixture
def dir_file(tiny_bert, tmp_path):
    dirs, settings = D.make_directions(tiny_bert.model, dims=2, seed=0)
    path = tmp_path / "d.h5"
    D.save_directions(path, dirs, settings)
    return path


def _reference_loss(model, batches):
    with torch.inference_mode():
        parts = [sequence_losses(model, b, "mlm") for b in batches]
    return float(sum(p.loss_sum.sum() for p in parts) / sum(p.n_tokens.sum() for p in parts))


def test_evaluate_equals_per_point_loop_on_non_square_grid(tiny_bert, bert_batches):
    model = tiny_bert.model
    dx, dy = (D.random_direction(model, seed=1, index=i) for i in range(2))
    xs, ys = np.array([-1.0, -0.25, 0.0, 0.5]), np.array([-0.5, 1.0])
    Z, A = S.evaluate(model, [dx, dy], bert_batches, xs, ys, return_accuracy=True, kind=tiny_bert.kind)
    assert Z.shape == A.shape == (2, 4)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(base[name] + x * dx[name] + y * dy[name])
            assert Z[iy, ix] == pytest.approx(_reference_loss(model, bert_batches), rel=1e-5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(base[name])
    assert Z[0, 2] != Z[1, 2]  # rows are y, not x
    assert np.all((A >= 0) & (A <= 1))
    line = S.evaluate(model, [dx], bert_batches, xs, kind=tiny_bert.kind)
    assert line.shape == (4,)
    assert line[2] == pytest.approx(_reference_loss(model, bert_batches), rel=1e-6)


def test_weights_bit_identical_after_evaluate_and_after_an_error(tiny_gpt2, tiny_corpus_file):
    model = tiny_gpt2.model
    batches = load_batches(tiny_gpt2, str(tiny_corpus_file), max_samples=6, seq_len=16, batch_size=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dirs = [D.random_direction(model, seed=s, ignore="none") for s in (0, 1)]
    S.evaluate(model, dirs, batches, [-0.3, 0.7, 2.0], [0.1, -1.0], kind=tiny_gpt2.kind)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    def boom(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        S.evaluate_points(model, dirs, batches, [(0.5, 0.5), (1.0, 1.0)], on_result=boom, kind=tiny_gpt2.kind)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's CPU attention fallback
def test_vmapped_points_per_pass_matches_in_place(tiny_bert, bert_batches):
    dirs = [D.random_direction(tiny_bert.model, seed=2, index=i) for i in range(2)]
    one = S.evaluate(tiny_bert.model, dirs, bert_batches, [-1, 0, 1], [0, 1], kind=tiny_bert.kind)
    many = S.evaluate(tiny_bert.model, dirs, bert_batches, [-1, 0, 1], [0, 1], points_per_pass=4, kind=tiny_bert.kind)
    np.testing.assert_allclose(many, one, rtol=1e-5)


@pytest.mark.parametrize("text", ["1:-1:5", "0:0:3", "-1:1:1", "-1:1:0", "a:b:c", "-1:1", "-1:1:5:2"])
def test_bad_ranges_are_usage_errors(text):
    with pytest.raises(UsageError):
        S.parse_range(text)


def test_default_grid_contains_origin():
    assert 0.0 in S.parse_range("-1:1:21")


def test_surface_file_resume_and_refusal(tiny_bert, bert_batches, dir_file, tmp_path):
    out = tmp_path / "s.h5"
    xs, ys = S.parse_range("-1:1:3"), S.parse_range("-0.5:0.5:2")
    first = S.compute_surface_file(out, tiny_bert.model, dir_file, bert_batches, xs, ys, progress=False,
                                   kind=tiny_bert.kind)
    assert first["computed"] == 6
    data = _load(out)
    assert data["train_loss"].shape == data["train_acc"].shape == (2, 3)
    np.testing.assert_array_equal(data["xcoordinates"], xs)
    np.testing.assert_array_equal(data["ycoordinates"], ys)
    assert data["attrs"]["dir_file"] == str(dir_file) and data["attrs"]["dtype"] == "float32"
    assert not S.journal_path(out).exists()
    # forget two points by hand (an edit drops the checksums, else the file reads as damaged):
    # a rerun computes only those, and gets the same numbers
    with h5py.File(out, "r+") as handle:
        handle["train_loss"][1, 0:2] = np.nan
        del handle.attrs["checksums"]
    again = S.compute_surface_file(out, tiny_bert.model, dir_file, bert_batches, xs, ys, progress=False,
                                   kind=tiny_bert.kind)
    assert again["computed"] == 2
    np.testing.assert_array_equal(_load(out)["train_loss"], data["train_loss"])
    with pytest.raises(UsageError, match="the sample changed"):
        S.compute_surface_file(out, tiny_bert.model, dir_file, bert_batches[:1], xs, ys, progress=False,
                               kind=tiny_bert.kind)
    with pytest.raises(UsageError, match="grid"):
        S.compute_surface_file(out, tiny_bert.model, dir_file, bert_batches, S.parse_range("-1:1:4"), ys,
                               progress=False, kind=tiny_bert.kind)
    replaced = S.compute_surface_file(out, tiny_bert.model, dir_file, bert_batches, S.parse_range("-1:1:4"), None,
                                      overwrite=True, progress=False, kind=tiny_bert.kind)
    assert replaced["computed"] == 4 and _load(out)["train_loss"].shape == (4,)
    assert "ycoordinates" not in _load(out)


def test_journal_replay_ignores_a_cut_last_record(tiny_bert, bert_batches, dir_file, tmp_path):
    out = tmp_path / "s.h5"
    xs = S.parse_range("-1:1:5")
    identity = surface_file.surface_identity(D.load_directions(dir_file)[1], bert_batches, tiny_bert.model, xs, None,
                                             kind=tiny_bert.kind)
    surface_file.open_journal(out, identity, 2, 5).append(surface_file.record(1, 2.5, 0.25))
    whole = S.journal_path(out).read_bytes()
    cut = JsonLines("surface").record(surface_file.record(3, 1.5, 0.5))
    S.journal_path(out).write_bytes(whole + cut[:9])
    journal = surface_file.open_journal(out, identity, 2, 5)
    assert journal.dropped_tail and S.journal_path(out).read_bytes() == whole  # cut off before any append
    assert [surface_file.record_values(r) for r in journal.records] == [(1, (2.5, 0.25))]


def _load(path):
    """The contract's datasets and the attributes of a surface file."""
    with h5py.File(path, "r") as handle:
        out = {k: np.asarray(handle[k][()]) for k in ("xcoordinates", "ycoordinates", "train_loss", "train_acc")
               if k in handle}
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
    return out


def _surface_cmd(model_dir, dir_file, corpus, out, grid_x, grid_y, *extra):
    return ["surface", "--model", str(model_dir), "--directions", str(dir_file),
            "--corpus", str(corpus), "--max-samples", "12", "--seq-len", "16", "--batch-size", "5",
            "--x", grid_x, "--y", grid_y, "--out", str(out), *extra]


def _journal_records(out):
    path = S.journal_path(out)
    return max(0, path.read_text().count("\n") - 1) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_file(tiny_bert, tiny_bert_dir, tiny_corpus_file, bert_batches,
                                                dir_file, tmp_path):
    out = tmp_path / "killed.h5"
    cmd = landscape_cmd(*_surface_cmd(tiny_bert_dir, dir_file, tiny_corpus_file, out, "-1:1:12", "-1:1:8",
                                      "--flush-seconds", "0"))
    for threshold in (10, 40):  # two kills at different moments; each while the HDF5 file is being rewritten
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while _journal_records(out) < threshold and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        seen = _journal_records(out)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert seen >= threshold, "the run ended before it could be killed"
        assert _journal_records(out) >= seen  # nothing already reported is lost
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "96 in the grid" in resumed.stdout
    computed_now = int(resumed.stdout.split("wrote ")[1].split(": ")[1].split(" ")[0])
    assert computed_now <= 96 - 40
    ref = S.evaluate(tiny_bert.model, D.load_directions(dir_file)[0], bert_batches,
                     S.parse_range("-1:1:12"), S.parse_range("-1:1:8"), return_accuracy=True, kind=tiny_bert.kind)
    data = _load(out)
    np.testing.assert_array_equal(data["train_loss"], ref[0])
    np.testing.assert_array_equal(data["train_acc"], ref[1])
    assert not S.journal_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "killed.h5"]


def _cli(args, capsys):
    from landscape.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse errors
        code = stop.code
    return code, capsys.readouterr().err


def test_cli_refuses_other_settings_and_bad_input(tiny_bert_dir, tiny_gpt2, tiny_corpus_file, dir_file, tmp_path,
                                                  capsys):
    out = tmp_path / "s.h5"
    base = _surface_cmd(tiny_bert_dir, dir_file, tiny_corpus_file, out, "-1:1:2", "-1:1:2")
    assert _cli(base, capsys)[0] == 0
    before = out.read_bytes()
    code, err = _cli(base + ["--seed", "3"], capsys)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == before and not S.journal_path(out).exists()
    gpt_dirs, settings = D.make_directions(tiny_gpt2.model, dims=2)
    D.save_directions(tmp_path / "gpt.h5", gpt_dirs, settings)
    wrong = [a if a != str(dir_file) else str(tmp_path / "gpt.h5") for a in base]
    code, err = _cli(wrong + ["--overwrite"], capsys)
    assert code == 2 and "bert.embeddings.word_embeddings.weight" in err
    (tmp_path / "junk.h5").write_text("junk")
    code, err = _cli([a if a != str(dir_file) else str(tmp_path / "junk.h5") for a in base], capsys)
    assert code == 2 and "not a direction file" in err
    for flag, bad in (("--x", "1:-1:2"), ("--y", "0:1:0")):
        args = list(base)
        args[args.index(flag) + 1] = bad
        code, err = _cli(args, capsys)
        assert code == 2 and flag in err and err.count("\n") == 1
    assert out.read_bytes() == before


@pytest.mark.distributed
def test_torchrun_two_ranks_gives_the_same_file(tiny_bert, tiny_bert_dir, tiny_corpus_file, bert_batches,
                                                dir_file, tmp_path):
    out = tmp_path / "ddp.h5"
    cmd = landscape_cmd(*_surface_cmd(tiny_bert_dir, dir_file, tiny_corpus_file, out, "-1:1:5", "-1:1:3",
                                      "--device", "cpu"), ranks=2)
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr  # whole: a rank's own error comes first
    assert res.stdout.count("wrote ") == 1  # one writer
    data = _load(out)
    assert data["attrs"]["world_size"] == 2
    ref = S.evaluate(tiny_bert.model, D.load_directions(dir_file)[0], bert_batches,
                     S.parse_range("-1:1:5"), S.parse_range("-1:1:3"), return_accuracy=True, kind=tiny_bert.kind)
    np.testing.assert_array_equal(data["train_loss"], ref[0])
    np.testing.assert_array_equal(data["train_acc"], ref[1])
