"""The demo pipeline end to end on the embedded model, at toy sizes, and its resume.

The toy demo every test starts from is run once per module (``finished_demo``) and each test gets
it back as it was written, at the same path: the figures' stamps name their files' absolute paths.
"""

import json
import shutil

import h5py
import numpy as np
import pytest

from landscape.demo import TOP_K, DemoSettings, run_demo

TOY = DemoSettings(fisher_samples=8, stability_fractions=(0.5, 0.25), eval_samples=2, grid_2d="-1:1:3",
                   grid_1d="-1:1:3", batch_size=4)


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """(folder, the paths ``run_demo`` returned, a copy of what it wrote) of the toy demo, run once."""
    folder = tmp_path_factory.mktemp("toy") / "demo"
    paths = run_demo(folder, TOY)
    kept = folder.parent / "as_written"
    shutil.copytree(folder, kept, symlinks=True)
    return folder, paths, kept


@pytest.fixture
def finished_demo(toy_demo):
    """(folder, paths) of the toy demo as ``run_demo`` wrote it, whatever an earlier test did to it."""
    folder, paths, kept = toy_demo
    for path in folder.parent.iterdir():  # the demo, a staging folder, a killed run's locks
        if path == kept:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    shutil.copytree(kept, folder, symlinks=True)
    return folder, paths


@pytest.mark.slow
def test_demo_writes_every_stage_and_resumes(finished_demo, capsys):
    folder, paths = finished_demo
    settings = TOY
    figures = {p.name for p in paths["figures"].iterdir()}
    for name in ("surface3d_all.png", "surface3d_top50.png", "surface3d_bottom50.png",
                 "compare_all_top_bottom.png", "topk_sweep.png", "random_controls.png", "surface3d_all.html"):
        assert name in figures, name
    assert (paths["profile"] / "parameters.png").exists() and (paths["profile"] / "sites.png").exists()
    assert paths["stability"].exists() and paths["schedule"].exists()
    surfaces = sorted((folder / "surfaces").glob("*.h5"))
    assert len(surfaces) == 3 + 2 * len(TOP_K)
    for path in surfaces:
        with h5py.File(path, "r") as handle:
            assert np.isfinite(handle["train_loss"][()]).all(), path.name
    # The origin is on every grid, and every surface evaluates the same fixed sample there.
    with h5py.File(surfaces[0], "r") as handle:
        z = handle["train_loss"][()]
    origin_losses = set()
    for path in surfaces:
        with h5py.File(path, "r") as handle:
            loss = handle["train_loss"][()]
            origin_losses.add(round(float(loss[1, 1] if loss.ndim == 2 else loss[1]), 6))
    assert len(origin_losses) == 1 and z.shape == (3, 3)

    capsys.readouterr()
    run_demo(folder, settings)
    log = capsys.readouterr().out
    assert log.count("already done, kept") >= 4
    assert log.count(": 0 new points of") == len(surfaces), "a finished surface point was computed again"


def _files(folder, hidden=True):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (hidden or not p.name.startswith("."))}


@pytest.mark.slow
def test_an_interrupted_overwrite_keeps_the_old_demo_whole_and_the_next_one_resumes_it(finished_demo, monkeypatch,
                                                                                      capsys):
    # A replacement once went stage by stage: stopped midway, it left new and old stages side by side.
    from landscape import demo as demo_module

    folder = finished_demo[0]
    staging = folder.parent / ".demo.new"
    old = TOY
    new = DemoSettings(**dict(vars(old), grid_2d="-0.5:0.5:3", grid_1d="-0.5:0.5:3"))
    finished = _files(folder)
    real = demo_module.run_surface

    def stopped(settings, **kw):
        if settings.grid.one_d:  # the 2D surfaces are built, the 1D ones not yet
            raise KeyboardInterrupt
        return real(settings, **kw)

    monkeypatch.setattr(demo_module, "run_surface", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_demo(folder, new, overwrite=True)
    assert _files(folder) == finished  # not a byte of the old demo changed
    assert (staging / "fisher.safetensors").exists() and (staging / "surfaces" / "all_2d.h5").exists()
    monkeypatch.setattr(demo_module, "run_surface", real)
    capsys.readouterr()
    run_demo(folder, new, overwrite=True)
    log = capsys.readouterr().out
    assert f"resuming the replacement built in '{staging}'" in log
    assert log.count("already done, kept") == 3 and log.count(": 0 new points of 9") == 3  # no stage twice
    assert not staging.exists() and sorted(_files(folder)) == sorted(finished)  # no note or lock left
    with h5py.File(folder / "surfaces" / "all_2d.h5", "r") as handle:
        assert float(np.max(handle["xcoordinates"][()])) == 0.5
    run_demo(folder, new)  # what moved in is a finished demo: a plain rerun keeps every stage
    log = capsys.readouterr().out
    assert log.count("already done, kept") == 4 and log.count(": 0 new points of") == 3 + 2 * len(TOP_K)
    # A staging folder of other settings is never resumed: it is removed and the replacement starts afresh.
    staging.mkdir()
    (staging / "fisher.safetensors").write_bytes(b"of another replacement")
    (staging / demo_module.REPLACEMENT_NOTE).write_text(json.dumps({"settings": vars(old), "device": "cpu"}))
    run_demo(folder, new, overwrite=True)
    log = capsys.readouterr().out
    assert "resuming the replacement" not in log and "already done, kept" not in log
    assert not staging.exists()


@pytest.mark.slow  # a real kill of a real demo: about 30-60 s
def test_a_killed_overwrite_leaves_the_old_demo_as_it_was(finished_demo):
    import subprocess

    from conftest import kill_when, landscape_cmd, subprocess_env

    folder = finished_demo[0]
    staging = folder.parent / ".demo.new"
    finished = _files(folder)
    # 16 samples: not the old demo's 8, so a new Fisher written over the old one would show below.
    cmd = landscape_cmd("demo", "--out", folder, "--overwrite", "--fisher-samples", 16, "--eval-samples", 2,
                        "--grid-2d", "-0.5:0.5:3", "--grid-1d", "-0.5:0.5:3", "--threads", 1)
    proc = subprocess.Popen([str(c) for c in cmd], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kill_when(proc, 0, staging / "directions" / "all_2d.h5")  # the new Fisher and profile done, surfaces to come
    assert (staging / "fisher.safetensors").exists()
    # The old Fisher, figures and surfaces as they were, no new file among them (the killed run's lock
    # files stay, as any killed command's: they block nothing).
    assert _files(folder, hidden=False) == finished
