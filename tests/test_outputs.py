"""Outputs (issue 19, items 2 and 3): never replace what a stage did not write; one writer per output.

Refusals run the CLI in this process (they happen before any model is loaded); locks are tested
with real processes: a first run frozen with SIGSTOP while it holds its output, a second run of the
same command refused naming it, a killed run whose lock blocks nothing.
"""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, ctrl_c_as_in_a_terminal
from conftest import cli_in_process as _cli
from conftest import landscape_cmd as _cmd
from conftest import one_line as _one_line
from conftest import subprocess_env as _env
from safetensors.torch import save_file

from landscape import outputs
from landscape.errors import OutputBusy, OutputRefused
from landscape.surface import file as surface_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _surface(path, fmt="landscape-surface", nx=5, ny=4):
    """A small 2D surface file: ours (format attribute) or the original code's (fmt=None)."""
    xs, ys = np.linspace(-1, 1, nx), np.linspace(-1, 1, ny)
    z = np.add.outer(ys ** 2, xs ** 2) + 1.0
    with h5py.File(path, "w") as handle:
        handle["xcoordinates"], handle["ycoordinates"] = xs, ys
        handle["train_loss"], handle["train_acc"] = z, np.zeros_like(z)
        if fmt:
            handle.attrs["format"] = fmt
    return path


@pytest.fixture
def foreign(tmp_path):
    """Files of every kind the campaign put under another stage's --out."""
    files = {"surface": _surface(tmp_path / "S.h5"), "original": _surface(tmp_path / "orig.h5", fmt=None),
             "report": tmp_path / "H.json", "weights": tmp_path / "w.safetensors", "journal": tmp_path / "runs.csv"}
    files["report"].write_text(json.dumps({"format": "landscape-hessian", "settings": {}}))
    save_file({"w": torch.zeros(3)}, str(files["weights"]), metadata={"format": "pt"})
    files["journal"].write_text("regularizer,fraction,seed,n_train,accuracy\ndropout,1.0,0,10,0.5\n")
    return files


def test_campaign_outputs_of_another_kind_are_refused_in_one_line(foreign, tmp_path, capfd):
    f = foreign
    fisher = tmp_path / "F.safetensors"
    save_file({"w": torch.ones(3)}, str(fisher), metadata={"format": "landscape-fisher-v1"})
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "sites.csv").write_bytes(f["journal"].read_bytes())
    cases = [
        (("directions", "--out", f["surface"]), "holds a loss surface, not a direction file", "--out"),
        (("directions", "--out", f["original"]), "not written by landscape", "--out"),
        (("schedule", fisher, "--out", f["report"]), "holds a Hessian report, not a dropout schedule", "--out"),
        (("fisher", "--out", f["weights"]), "model weights", "--out"),
        (("finetune", "--out", f["journal"]), "holds a table with the columns (regularizer, fraction, seed", "--out"),
        (("compare", f["surface"], "--out", tmp_path / "c.png", "--csv", f["journal"]), "holds a table", "--csv"),
        (("stability", "--out", f["journal"]), "not the table this command writes", "--out"),
        (("hessian", "--out", tmp_path / "h.json", "--vectors", f["surface"]), "not a direction file", "--vectors"),
        (("profile", fisher, "--out", tmp_path / "prof"), "sites.csv' holds a table", "--out"),
    ]
    for args, words, flag in cases:
        before = {p: p.read_bytes() for p in f.values()}
        code, _, err = _cli(capfd, *args)
        line = _one_line(code, err, words, f"choose another {flag} or pass --overwrite")
        assert "overwrite=True" not in line
        assert {p: p.read_bytes() for p in f.values()} == before, args
    code, _, err = _cli(capfd, "surface", "--directions", tmp_path / "nodirs.h5", "--out", f["original"])
    _one_line(code, err, "not written by landscape", "not a loss surface")
    assert not any(p.name.endswith(".lock") for p in tmp_path.rglob("*")), "a refused run left its lock"


def test_the_library_speaks_of_overwrite_true(foreign):
    with pytest.raises(OutputRefused, match=r"holds a Hessian report, not a dropout schedule; pass overwrite=True"):
        outputs.claim_output(foreign["report"], "schedule")
    with outputs.claim_output(foreign["report"], "schedule", overwrite=True):
        assert outputs.lock_path(foreign["report"]).exists()
    assert not outputs.lock_path(foreign["report"]).exists()


@pytest.mark.slow
def test_plot_redraws_its_own_figure_refuses_others_and_overwrite_replaces(foreign, tmp_path, capfd):
    other = _surface(tmp_path / "other.h5", nx=6)
    for suffix in (".png", ".pdf", ".html"):
        out = tmp_path / f"fig{suffix}"
        assert _cli(capfd, "plot", foreign["surface"], "--out", out, "--kind", "contour")[0] == 0
        held = outputs.identify(out)
        assert held.kind == "figure" and held.stamp["settings"]["inputs"] == [str(foreign["surface"])]
        assert _cli(capfd, "plot", foreign["surface"], "--out", out, "--kind", "heatmap")[0] == 0  # redrawn
        code, _, err = _cli(capfd, "plot", other, "--out", out)
        _one_line(code, err, "holds another figure drawn by landscape", "other.h5")
        assert _cli(capfd, "plot", other, "--out", out, "--overwrite")[0] == 0
        assert outputs.identify(out).stamp["settings"]["inputs"] == [str(other)]
    photo = tmp_path / "photo.png"
    import matplotlib.pyplot as plt

    plt.imsave(photo, np.zeros((4, 4)))
    code, _, err = _cli(capfd, "plot", other, "--out", photo)
    _one_line(code, err, "holds a PNG image not drawn by landscape, not a figure drawn by landscape")
    assert not list(tmp_path.glob(".*.lock")), "a finished or refused run left its lock file"


def test_svg_figures_carry_the_stamp_too(tmp_path):
    import matplotlib.pyplot as plt

    out = tmp_path / "f.svg"
    with outputs.claim_output(out, "figure", settings={"inputs": ["x"]}):
        fig = plt.figure()
        fig.savefig(out, format="svg", metadata=outputs.figure_metadata(out, "svg"))
        plt.close(fig)
    assert outputs.identify(out).stamp == {"kind": "figure", "settings": {"inputs": ["x"]}}


def test_claims_are_reentrant_and_a_dead_holder_blocks_nothing(tmp_path):
    out = tmp_path / "F.safetensors"
    side = outputs.lock_path(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    side.write_text(f"{dead.pid} landscape fisher --out {out}\n")  # a killed run's left-over lock file
    with outputs.claim_output(out, "fisher"):
        with outputs.claim_output(out, "fisher"):  # the library claims again what the CLI holds
            pass
        assert side.read_text().split()[0] == str(os.getpid())
    assert not side.exists()


def test_a_claim_held_by_a_live_process_is_refused_naming_it(tmp_path):
    out = tmp_path / "D.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from landscape.outputs import claim_output; "
                               "claim_output(sys.argv[1], 'directions'); print('held', flush=True); time.sleep(120)",
                               str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputBusy, match=f"another run is writing '{out}' \\(pid {holder.pid}: "):
            outputs.claim_output(out, "directions")
    finally:
        holder.kill()
        holder.wait()
    with outputs.claim_output(out, "directions"):  # the kernel dropped the dead holder's lock
        pass
    assert list(tmp_path.iterdir()) == []


def _wait_lock(proc, out, limit=120):
    """Wait until ``proc`` holds ``out``'s lock, then freeze it there."""
    side, deadline = outputs.lock_path(out), time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        try:
            if side.read_text().split(" ", 1)[0] == str(proc.pid):
                proc.send_signal(signal.SIGSTOP)
                return
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(0.002)
    raise AssertionError(f"{proc.args} never held '{out}' (exit {proc.poll()}: {proc.communicate()[1][-2000:]})")


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(tiny_bert_dir,
                                                                                      tiny_corpus_file, tmp_path):
    model, corpus = ["--model", tiny_bert_dir], ["--corpus", tiny_corpus_file, "--max-samples", 4, "--seq-len", 16]
    # Each first run is frozen as soon as it holds its lock; these take seconds after that point, so
    # the freeze never comes too late (a big surface costs nothing: it is read after the claim).
    big = _surface(tmp_path / "big.h5", nx=400, ny=300)
    commands = {
        "fisher": ["fisher", *model, *corpus, "--quiet", "--out", tmp_path / "F.safetensors"],
        "directions": ["directions", *model, "--kind", "hessian", *corpus, "--out", tmp_path / "D.h5"],
        "hessian": ["hessian", *model, *corpus, "--top", 1, "--quiet", "--out", tmp_path / "H.json"],
        "plot": ["plot", big, "--kind", "surface3d", "--out", tmp_path / "big.png"],
    }
    first = {name: subprocess.Popen(_cmd(*args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
    try:
        for name, proc in first.items():
            _wait_lock(proc, commands[name][-1])
        seconds = {name: subprocess.Popen(_cmd(*args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
        for name, proc in seconds.items():
            _, err = proc.communicate(timeout=300)
            _one_line(proc.returncode, err, "another run is writing", f"pid {first[name].pid}: landscape {name}",
                      "wait for it to finish or choose another --out")
    finally:
        for proc in first.values():
            proc.kill()
            proc.wait()
    kinds = {"fisher": "fisher", "directions": "directions", "hessian": "hessian-report", "plot": "figure"}
    for name, args in commands.items():  # killed while holding it: its lock file stays and blocks nothing
        assert outputs.lock_path(args[-1]).read_text().startswith(f"{first[name].pid} ")
        with outputs.claim_output(args[-1], kinds[name], overwrite=True):
            pass
        assert not outputs.lock_path(args[-1]).exists()


def _records(path):
    journal = surface_file.journal_path(path)
    return journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0


@pytest.mark.slow
def test_surface_overwrite_keeps_the_old_file_until_the_new_one_is_complete(tiny_bert_dir, tiny_corpus_file,
                                                                             tmp_path, capfd):
    dirs, out = tmp_path / "D.h5", tmp_path / "S.h5"
    assert _cli(capfd, "directions", "--model", tiny_bert_dir, "--out", dirs)[0] == 0
    common = ["surface", "--model", tiny_bert_dir, "--directions", dirs, "--corpus", tiny_corpus_file,
              "--max-samples", 8, "--seq-len", 16, "--out", out]
    assert _cli(capfd, *common, "--x", "-1:1:3", "--y", "-1:1:3")[0] == 0
    old = out.read_bytes()
    new = [*common, "--x", "-1:1:10", "--y", "-1:1:6", "--overwrite"]
    proc = subprocess.Popen(_cmd(*new), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    aside = surface_file.aside_path(out)
    deadline = time.time() + 120
    while _records(aside) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None and _records(aside) >= 5
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the replacement
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert out.read_bytes() == old, "an interrupted --overwrite must keep the finished file"
    code, stdout, _ = _cli(capfd, *new)  # rerunning the replacement resumes it
    assert code == 0 and "point(s) computed now, 60 in the grid" in stdout
    assert "60 point(s) computed now" not in stdout
    with h5py.File(out, "r") as handle:
        assert handle["train_loss"].shape == (6, 10) and np.isfinite(handle["train_loss"][()]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D.h5", "S.h5"]


def test_the_demo_refuses_a_file_it_did_not_write_and_leaves_nothing(foreign, tmp_path):
    from landscape.demo import DemoSettings, run_demo

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "schedule.json").write_bytes(foreign["report"].read_bytes())
    with pytest.raises(OutputRefused, match="schedule.json' holds a Hessian report, not a dropout schedule"):
        run_demo(demo, DemoSettings(fisher_samples=8, eval_samples=2, grid_2d="-1:1:3", grid_1d="-1:1:3"))
    assert [p.name for p in demo.rglob("*")] == ["schedule.json"]


def test_finetune_never_saves_a_model_over_a_folder_of_other_files(tmp_path, capfd):
    run_folder = tmp_path / "models" / "dropout_f1_s0"
    run_folder.mkdir(parents=True)
    (run_folder / "notes.txt").write_text("mine")
    args = ["finetune", "--regularizer", "dropout", "--restarts", 1, "--out", tmp_path / "s.csv",
            "--save-models", tmp_path / "models"]
    code, _, err = _cli(capfd, *args)
    _one_line(code, err, "dropout_f1_s0' holds a folder of other files, not a saved model", "--overwrite")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dropout_f1_s0", "models", "notes.txt"]


def test_two_options_naming_one_file_are_refused_before_anything_loads(foreign, tmp_path, capfd, monkeypatch):
    # `finetune --out r.csv --runs-out r.csv` once wrote its summary over its own journal (exit 0).
    f = foreign
    monkeypatch.chdir(tmp_path)
    fisher = tmp_path / "F.safetensors"
    save_file({"w": torch.ones(3)}, str(fisher), metadata={"format": "landscape-fisher-v1"})
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood,1\nbad,0\n")
    os.link(data, tmp_path / "hard.csv")
    cases = [  # every command with two or more path options; each pair passes the suffix checks
        (("finetune", "--out", "r.csv", "--runs-out", "./r.csv"), "--out 'r.csv' and --runs-out 'r.csv'"),
        (("finetune", "--dataset", data, "--out", tmp_path / "hard.csv"), "--out", "and --dataset"),
        (("finetune", "--out", "o.csv", "--save-models", "m", "--model", "m"), "--save-models 'm' and --model 'm'"),
        (("surface", "--directions", f["surface"], "--out", f["surface"]), "--out", "and --directions"),
        (("surface", "--directions", "d.h5", "--eval-corpus", "e.h5", "--out", "e.h5"), "and --eval-corpus"),
        (("fisher", "--corpus", "F.safetensors", "--out", fisher), "--out", "and --corpus"),
        (("stability", "--corpus", data, "--out", data), "--out", "and --corpus"),
        (("schedule", "s.json", "--out", "s.json"), "--out 's.json' and fisher 's.json'"),
        (("profile", "p", "--out", "p"), "--out 'p' and fisher 'p'"),
        (("directions", "--fisher", "D.h5", "--subset", "top50", "--out", "D.h5"), "--out 'D.h5' and --fisher"),
        (("directions", "--kind", "hessian", "--corpus", "D.h5", "--out", "D.h5"), "--out 'D.h5' and --corpus"),
        (("hessian", "--out", "h.json", "--fisher", "h.json", "--subset", "top50"), "--out 'h.json' and --fisher"),
        (("hessian", "--out", "h.json", "--vectors", "v.h5", "--corpus", "v.h5"), "--vectors 'v.h5' and --corpus"),
        (("compare", f["surface"], "--out", "c.png", "--csv", "c.csv", "--hessian", "c.csv"),
         "--csv 'c.csv' and --hessian 'c.csv'"),
        (("plot", "p.png", "--out", "p.png"), "--out 'p.png' and surface 'p.png'"),
        (("export", "--vtk", "v.vtp", "--out", "v.vtp"), "--out 'v.vtp' and --vtk 'v.vtp'"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    contents = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for args, *words in cases:
        started = time.perf_counter()
        code, _, err = _cli(capfd, *args)
        _one_line(code, err, *words, "are the same file; give each its own")
        assert time.perf_counter() - started < 5, args  # refused before any model or data loads
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert {p: p.read_bytes() for p in contents} == contents


def test_the_library_names_its_settings_when_two_name_one_file(tmp_path):
    from landscape.errors import SamePath
    from landscape.files import check_distinct_paths
    from landscape.guided.finetune import FinetuneSettings, run_finetune

    with pytest.raises(SamePath, match=r"^out '.*r.csv' and runs_out '.*r.csv' are the same file"):
        run_finetune(FinetuneSettings(), out=tmp_path / "r.csv", runs_out=tmp_path / "sub" / ".." / "r.csv", log=None)
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with pytest.raises(SamePath, match="out .* and fisher"):
        check_distinct_paths({"out": tmp_path / "link" / "x"}, {"fisher": tmp_path / "a" / "x"})
    check_distinct_paths({"out": "a.csv"}, {"corpus": "b.csv", "eval_corpus": "b.csv", "model": object()})
    assert list(tmp_path.glob("*.csv")) == []


_KILL_HOOK = '''
import contextlib, os, signal
import landscape.files as files
_real, _count = files.atomic_output, [0]
@contextlib.contextmanager
def _killing(path):
    with _real(path) as tmp:
        yield tmp
    _count[0] += 1
    if _count[0] >= int(os.environ["KILL_AFTER_WRITES"]):
        os.kill(os.getpid(), signal.SIGKILL)
files.atomic_output = _killing
'''


@pytest.mark.parametrize("command", ["compare", "profile"])
@pytest.mark.slow  # a real kill of a real run: about 5-20 s
def test_a_result_of_several_files_killed_midway_keeps_the_finished_one_whole(command, tiny_bert_dir, tmp_path,
                                                                            capfd):
    # SIGKILL after the first file of the new result is written (a sitecustomize hook kills the
    # process as its writer returns): every file of the finished result must still be the old one.
    from landscape.fisher import save_fisher
    from landscape.models import load_model

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_KILL_HOOK)
    if command == "compare":
        first = (_surface(tmp_path / "a.h5"), _surface(tmp_path / "b.h5", nx=7))
        base = ["compare", *first, "--out", tmp_path / "c.png"]
        again = [*base, "--labels", "one,two", "--overwrite"]
        files = [tmp_path / "c.png", tmp_path / "c.sharpness.csv"]
    else:
        params = dict(load_model(str(tiny_bert_dir)).model.named_parameters())
        for seed, name in ((0, "F0"), (1, "F1")):
            torch.manual_seed(seed)
            save_fisher(tmp_path / f"{name}.safetensors", {n: torch.rand_like(p) for n, p in params.items()}, {})
        base = ["profile", tmp_path / "F0.safetensors", "--model", tiny_bert_dir, "--out", tmp_path / "prof"]
        again = ["profile", tmp_path / "F1.safetensors", "--model", tiny_bert_dir, "--out", tmp_path / "prof",
                 "--overwrite"]
        files = [tmp_path / "prof" / name for name in ("parameter_quantiles.csv", "parameters.png", "tensors.csv",
                                                        "blocks.csv", "sites.csv", "blocks.png", "sites.png")]
    code, _, err = _cli(capfd, *base)  # the finished result: made in this process (the kills are what need one)
    assert code == 0, err
    finished = {p: p.read_bytes() for p in files}
    env = dict(_env(), KILL_AFTER_WRITES="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hook"), env["PYTHONPATH"]])
    killed = subprocess.run(_cmd(*again), env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert {p: p.read_bytes() for p in files} == finished
    done = subprocess.run(_cmd(*again), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert files[0].read_bytes() != finished[files[0]]  # the new result, now in place
    assert not [p for p in tmp_path.rglob(".*") if ".new" in p.name]
