"""The demo pipeline end to end on the embedded model, at toy sizes, and its resume."""

import h5py
import numpy as np
import pytest

from landscape.demo import TOP_K, DemoSettings, run_demo


@pytest.mark.slow
def test_demo_writes_every_stage_and_resumes(tmp_path, capsys):
    settings = DemoSettings(fisher_samples=8, stability_fractions=(0.5, 0.25), eval_samples=2,
                            grid_2d="-1:1:3", grid_1d="-1:1:3", batch_size=4)
    paths = run_demo(tmp_path / "demo", settings)
    figures = {p.name for p in paths["figures"].iterdir()}
    for name in ("surface3d_all.png", "surface3d_top50.png", "surface3d_bottom50.png",
                 "compare_all_top_bottom.png", "topk_sweep.png", "random_controls.png", "surface3d_all.html"):
        assert name in figures, name
    assert (paths["profile"] / "parameters.png").exists() and (paths["profile"] / "sites.png").exists()
    assert paths["stability"].exists() and paths["schedule"].exists()
    surfaces = sorted((tmp_path / "demo" / "surfaces").glob("*.h5"))
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
    run_demo(tmp_path / "demo", settings)
    log = capsys.readouterr().out
    assert log.count("already done, kept") >= 4
    assert log.count(": 0 new points of") == len(surfaces), "a finished surface point was computed again"
