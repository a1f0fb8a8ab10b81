"""The whole pipeline on the embedded model and corpus, one resumable stage at a time.

Fisher → stability table → profile → directions (all / top-50% / bottom-50%, a top-k sweep and
random controls of the same sizes) → surfaces → figures → guided dropout schedule.  Every stage
writes files under one folder and is skipped when its files are already there, so an interrupted
demo continues where it stopped (surfaces resume point by point).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import directions, fisher, render, schedule, sharpness, surface
from .corpus import load_batches
from .models import load_model

SURFACES_2D = (("all", "all"), ("top50", "top:50"), ("bottom50", "bottom:50"))
TOP_K = (80, 50, 20, 5, 1, 0.25)


@dataclass
class DemoSettings:
    """Sizes of the demo's samples and grids, chosen to finish in minutes on 2 CPU cores."""

    fisher_samples: int = 2048  # packed sequences for the Fisher and the stability reference
    stability_fractions: tuple = (0.33, 0.1, 0.05, 0.01, 0.001)
    eval_samples: int = 32  # fixed evaluation sample of every surface
    grid_2d: str = "-1:1:21"
    grid_1d: str = "-1:1:41"
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    points_per_pass: int = 1


class _Stages:
    """Runs named stages in order, skipping those whose outputs exist, and times them."""

    def __init__(self, total):
        self.total, self.done = total, 0

    def run(self, title, outputs, work):
        self.done += 1
        outputs = [Path(p) for p in outputs]
        prefix = f"[{self.done}/{self.total}] {title}"
        if outputs and all(p.exists() for p in outputs):
            print(f"{prefix}: already done, kept", flush=True)
            return
        print(f"{prefix} ...", flush=True)
        start = time.perf_counter()
        work()
        print(f"{prefix}: done in {time.perf_counter() - start:.0f} s", flush=True)


def _label(spec):
    kind, _, size = spec.partition(":")
    return f"{kind}{size}".replace(".", "p") if size else kind


def run_demo(out_dir="landscape_demo", settings=None, device="cpu"):
    """Run every stage into ``out_dir``; returns {name: path} of the main results."""
    from . import profile as profile_stage
    from . import stability as stability_stage

    cfg = settings or DemoSettings()
    out = Path(out_dir)
    dirs_dir, surf_dir, fig_dir = out / "directions", out / "surfaces", out / "figures"
    for folder in (dirs_dir, surf_dir, fig_dir):
        folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    loaded = load_model(None, device=device)
    model = loaded.model
    paths = {"fisher": out / "fisher.safetensors", "stability": out / "stability.csv",
             "profile": out / "profile", "schedule": out / "schedule.json", "figures": fig_dir}
    stages = _Stages(total=8)

    def fisher_and_stability_stage():
        # The stability reference is the Fisher of all samples: one pass gives both.
        batches = load_batches(loaded, max_samples=cfg.fisher_samples, seq_len=cfg.seq_len,
                               batch_size=cfg.batch_size, seed=cfg.seed)
        table, scores = stability_stage.stability_and_reference(
            model, batches, fractions=cfg.stability_fractions, progress=True)
        n = sum(b["labels"].shape[0] for b in batches)
        fisher.save_fisher(paths["fisher"], scores,
                           fisher.provenance(loaded.source, None, None, n, cfg.seed, seq_len=cfg.seq_len))
        stability_stage.write_csv(table, paths["stability"])
        print(stability_stage.format_table(table))

    stages.run("Fisher information and its stability over nested sub-samples",
               [paths["fisher"], paths["stability"]], fisher_and_stability_stage)
    scores, _ = fisher.load_fisher(paths["fisher"])

    stages.run("Fisher profile (per parameter, per dropout site)", [paths["profile"] / "sites.png"],
               lambda: profile_stage.write_profile(scores, model, paths["profile"], title="embedded model"))

    eval_batches = load_batches(loaded, max_samples=cfg.eval_samples, seq_len=cfg.seq_len,
                                batch_size=cfg.batch_size, seed=cfg.seed + 1)
    specs_2d = list(SURFACES_2D)
    specs_1d = [(_label(f"top:{k}"), f"top:{k}") for k in TOP_K] + \
               [(_label(f"random:{k}"), f"random:{k}") for k in TOP_K]

    def direction_file(name, spec, dims):
        path = dirs_dir / f"{name}_{dims}d.h5"
        if not path.exists():
            dirs, dir_settings = directions.make_directions(
                model, dims=dims, seed=cfg.seed, fisher=None if spec == "all" else scores, subset=spec)
            dir_settings.update(model=loaded.source, fisher=str(paths["fisher"]))
            directions.save_directions(path, dirs, dir_settings)
        return path

    def directions_stage():
        for name, spec in specs_2d:
            direction_file(name, spec, 2)
        for name, spec in specs_1d:
            direction_file(name, spec, 1)

    stages.run("random directions (filter-normalized, Fisher-masked)",
               [dirs_dir / f"{n}_2d.h5" for n, _ in specs_2d] + [dirs_dir / f"{n}_1d.h5" for n, _ in specs_1d],
               directions_stage)

    xs = surface.parse_range(cfg.grid_2d, "--x")
    xs_1d = surface.parse_range(cfg.grid_1d, "--x")
    run_settings = {"model": loaded.source, "corpus": "embedded default", "max_samples": cfg.eval_samples,
                    "seed": cfg.seed + 1, "seq_len": cfg.seq_len}

    def surface_stage(dims, specs, grid):
        for name, spec in specs:
            result = surface.compute_surface_file(
                surf_dir / f"{name}_{dims}d.h5", model, direction_file(name, spec, dims), eval_batches,
                grid, grid if dims == 2 else None, settings=run_settings,
                points_per_pass=cfg.points_per_pass, progress=True)
            print(f"  {name}_{dims}d.h5: {result['computed']} new points of {result['total']}", flush=True)

    # No "already done" shortcut here: compute_surface_file itself skips finished points.
    stages.run(f"2D loss surfaces ({len(xs)}x{len(xs)} grid, {len(specs_2d)} direction sets)", [],
               lambda: surface_stage(2, specs_2d, xs))
    stages.run(f"1D loss curves ({len(xs_1d)} points, {len(specs_1d)} direction sets)", [],
               lambda: surface_stage(1, specs_1d, xs_1d))

    def figures_stage():
        _figures(surf_dir, fig_dir, specs_2d, specs_1d)

    stages.run("figures", [], figures_stage)

    def schedule_stage():
        s = schedule.guided_dropout(model, scores, p_upper=0.1, p_lower=0.0, model_source=loaded.source,
                                    fisher_source=str(paths["fisher"]))
        schedule.save_schedule(s, paths["schedule"])
        print(schedule.format_table(s))

    stages.run("guided dropout schedule", [paths["schedule"]], schedule_stage)
    return paths


def _figures(surf_dir, fig_dir, specs_2d, specs_1d):
    """Surface plots, the Figure-1 comparison, the top-k sweep and the random controls, with CSVs."""
    two_d = [surf_dir / f"{name}_2d.h5" for name, _ in specs_2d]
    labels_2d = ["all parameters", "top 50% by Fisher", "bottom 50% by Fisher"]
    for path, (name, _) in zip(two_d, specs_2d):
        render.plot_surface(path, fig_dir / f"surface3d_{name}.png", kind="surface3d")
        render.plot_surface(path, fig_dir / f"contour_{name}.png", kind="contour")
    render.plot_surface(two_d[0], fig_dir / "surface3d_all.html", kind="surface3d")
    rows = render.compare_surfaces(two_d, labels_2d, fig_dir / "compare_all_top_bottom.png", kind="surface3d")
    print(sharpness.format_table(rows))
    top = [(n, s) for n, s in specs_1d if s.startswith("top")]
    rand = [(n, s) for n, s in specs_1d if s.startswith("random")]
    for group, title in ((top, "topk_sweep"), (rand, "random_controls")):
        rows = render.compare_surfaces([surf_dir / f"{n}_1d.h5" for n, _ in group],
                                       [s.replace(":", " ") + "%" for _, s in group],
                                       fig_dir / f"{title}.png")
        print(sharpness.format_table(rows))
