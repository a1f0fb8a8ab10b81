"""The whole pipeline on the embedded model and corpus, as a declared list of resumable stages.

Fisher → stability table → profile → directions (all / top-50% / bottom-50%, a top-k sweep and
random controls of the same sizes) → surfaces → figures → guided dropout schedule.  Every stage
writes files under one folder and is skipped when its files are already there, so an interrupted
demo continues where it stopped (surfaces resume point by point).
"""

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from .defaults import DemoSettings
from .direction_kinds import make as make_directions
from .files import PathLike, atomic_output, check_output_folder, json_text, replace_together, staged_path
from .fisher import run_stability
from .fisher.stability import format_table as stability_table
from .guided import profile as profile_stage
from .guided import schedule
from .guided.schedule_stage import run_schedule
from .models import LoadedModel, load_model
from .outputs import claim_output
from .plots import surfaces as plots
from .settings import (
    DirectionsSettings,
    GridSpec,
    ModelSpec,
    ProfileSettings,
    SampleSpec,
    ScheduleSettings,
    StabilitySettings,
    SurfaceSettings,
)
from .surface import run_surface, sharpness

SURFACES_2D = (("all", "all"), ("top50", "top:50"), ("bottom50", "bottom:50"))
TOP_K = (80, 50, 20, 5, 1, 0.25)


def _label(spec):
    kind, _, size = spec.partition(":")
    return f"{kind}{size}".replace(".", "p") if size else kind


@dataclass
class DemoRun:
    """What the stages share: settings, the model, where files go; samples are made when first needed."""

    out: Path
    cfg: DemoSettings
    loaded: LoadedModel
    overwrite: bool = False
    threads: str = "auto"
    specs_2d: list = field(default_factory=lambda: list(SURFACES_2D))
    specs_1d: list = field(default_factory=lambda: [(_label(f"top:{k}"), f"top:{k}") for k in TOP_K]
                           + [(_label(f"random:{k}"), f"random:{k}") for k in TOP_K])
    figure_claims: dict = field(default_factory=dict)  # {figure file name: its Claim}, stamped into it

    @property
    def paths(self):
        """{stage output: its path under ``out``}."""
        return {"fisher": self.out / "fisher.safetensors", "stability": self.out / "stability.csv",
                "profile": self.out / "profile", "schedule": self.out / "schedule.json",
                "figures": self.out / "figures", "directions": self.out / "directions",
                "surfaces": self.out / "surfaces"}

    @property
    def model_spec(self) -> ModelSpec:
        """The spec of the demo's model (the embedded one, already loaded), for every stage's settings."""
        return ModelSpec(device=str(next(self.loaded.model.parameters()).device), threads=self.threads)

    def sample(self, max_samples: int, seed: int) -> SampleSpec:
        """A sample of the embedded corpus at the demo's sequence length and batch size."""
        return SampleSpec(max_samples=max_samples, seq_len=self.cfg.seq_len, batch_size=self.cfg.batch_size, seed=seed)

    def direction_file(self, name, spec, dims):
        """The direction file of one surface, written unless it exists (or ``overwrite``).

        Args:
            name: the surface's name, in the file name.
            spec: the Fisher subset ('all', 'top:K', 'random:K', ...).
            dims: 1 or 2 directions.

        Returns:
            Its path.
        """
        path = self.paths["directions"] / f"{name}_{dims}d.h5"
        if not path.exists() or self.overwrite:
            # The model is the loaded one; its device is not a setting of random directions (made on the CPU).
            settings = DirectionsSettings(ModelSpec(threads=self.threads), dims=dims, seed=self.cfg.seed,
                                          fisher=None if spec == "all" else self.paths["fisher"], subset=spec)
            make_directions(settings, out=path, model=self.loaded, overwrite=self.overwrite)
        return path


# ----------------------------------------------------------------------------- the stages
def _fisher_and_stability(run: DemoRun):
    # The stability reference is the Fisher of all samples: one pass gives both.
    cfg, paths = run.cfg, run.paths
    settings = StabilitySettings(run.model_spec, run.sample(cfg.fisher_samples, cfg.seed),
                                 fractions=cfg.stability_fractions)
    result = run_stability(settings, out=paths["stability"], model=run.loaded, fisher_out=paths["fisher"],
                           overwrite=run.overwrite)
    print(stability_table(result.rows))


def _profile(run: DemoRun):
    settings = ProfileSettings(run.paths["fisher"], run.model_spec)
    profile_stage.run_profile(settings, out=run.paths["profile"], model=run.loaded, overwrite=run.overwrite)


def _directions(run: DemoRun):
    for name, spec in run.specs_2d:
        run.direction_file(name, spec, 2)
    for name, spec in run.specs_1d:
        run.direction_file(name, spec, 1)


def _claim_outputs(run: DemoRun, overwrite: bool, held: contextlib.ExitStack):
    """Claim every file the demo writes (``outputs.claim_output``) into ``held``, which releases them."""
    paths = run.paths

    def take(path, kind, columns=None):
        return held.enter_context(claim_output(path, kind, overwrite, columns=columns))

    take(run.out, "folder")
    take(paths["fisher"], "fisher")
    take(paths["stability"], "table", ("fraction", "samples"))
    take(paths["schedule"], "schedule")
    held.enter_context(profile_stage.claim_profile(paths["profile"], paths["fisher"], overwrite))
    for dims, specs in ((2, run.specs_2d), (1, run.specs_1d)):
        for name, _ in specs:
            take(paths["directions"] / f"{name}_{dims}d.h5", "directions")
            take(paths["surfaces"] / f"{name}_{dims}d.h5", "surface")
    figures = [f"{kind}_{name}.png" for name, _ in run.specs_2d for kind in ("surface3d", "contour")]
    for name in figures + ["surface3d_all.html", "compare_all_top_bottom.png", "topk_sweep.png",
                           "random_controls.png"]:
        run.figure_claims[name] = take(paths["figures"] / name, "figure")
    for name in ("compare_all_top_bottom", "topk_sweep", "random_controls"):
        take(plots.default_csv_path(paths["figures"] / f"{name}.png"), "table", sharpness.COLUMNS[:4])


def _surfaces(run: DemoRun, dims: int):
    specs = run.specs_2d if dims == 2 else run.specs_1d
    axis = run.cfg.grid_2d if dims == 2 else run.cfg.grid_1d
    grid = GridSpec(x=axis, y=axis) if dims == 2 else GridSpec(x=axis, one_d=True)
    # Seed + 1: the surfaces are evaluated on other samples than the Fisher's.
    sample = run.sample(run.cfg.eval_samples, run.cfg.seed + 1)
    for name, spec in specs:
        settings = SurfaceSettings(run.direction_file(name, spec, dims), run.model_spec, sample, grid,
                                   points_per_pass=run.cfg.points_per_pass)
        result = run_surface(settings, out=run.paths["surfaces"] / f"{name}_{dims}d.h5", model=run.loaded,
                             overwrite=run.overwrite)
        print(f"  {name}_{dims}d.h5: {result.computed} new points of {result.total}", flush=True)


def _figures_stage(run: DemoRun):
    _figures(run.paths["surfaces"], run.paths["figures"], run.specs_2d, run.specs_1d, run.figure_claims)


def _schedule(run: DemoRun):
    settings = ScheduleSettings(run.paths["fisher"], run.model_spec, p_upper=0.1, p_lower=0.0)
    made = run_schedule(settings, out=run.paths["schedule"], model=run.loaded, overwrite=run.overwrite)
    print(schedule.format_table(made.schedule))


@dataclass(frozen=True)
class Stage:
    """One step of the demo.

    ``done(run)`` lists the files whose existence means it is finished (empty: always run; such a
    stage resumes by itself, like a surface file).
    """

    title: Callable[[DemoRun], str]
    done: Callable[[DemoRun], List[Path]]
    work: Callable[[DemoRun], None]


STAGES = (
    Stage(lambda r: "Fisher information and its stability over nested sub-samples",
          lambda r: [r.paths["fisher"], r.paths["stability"]], _fisher_and_stability),
    Stage(lambda r: "Fisher profile (per parameter, per dropout site)",
          lambda r: [r.paths["profile"] / "sites.png"], _profile),
    Stage(lambda r: "random directions (filter-normalized, Fisher-masked)",
          lambda r: [r.paths["directions"] / f"{n}_2d.h5" for n, _ in r.specs_2d]
          + [r.paths["directions"] / f"{n}_1d.h5" for n, _ in r.specs_1d], _directions),
    Stage(lambda r: f"2D loss surfaces ({r.cfg.grid_2d} squared, {len(r.specs_2d)} direction sets)",
          lambda r: [], lambda r: _surfaces(r, 2)),
    Stage(lambda r: f"1D loss curves ({r.cfg.grid_1d}, {len(r.specs_1d)} direction sets)",
          lambda r: [], lambda r: _surfaces(r, 1)),
    Stage(lambda r: "figures", lambda r: [], _figures_stage),
    Stage(lambda r: "guided dropout schedule", lambda r: [r.paths["schedule"]], _schedule),
)


def run_demo(out_dir: PathLike = "landscape_demo", settings: Optional[DemoSettings] = None,
             device: Union[str, torch.device] = "cpu", overwrite: bool = False,
             threads: Union[int, str] = "auto") -> Dict[str, Path]:
    """Run every stage into ``out_dir``; returns {name: path} of the main results.

    Files of a finished stage are kept (rerunning continues an interrupted demo); a file there that
    the demo did not write is refused unless ``overwrite``, which recomputes every stage.  With
    ``overwrite`` on a folder that holds files, the new run is built in a staging folder beside it
    (``.NAME.new``) and its files move into place only once every stage is done: until then the
    folder keeps its old results whole.  A staging folder left by a killed replacement is resumed
    by the next ``overwrite`` run with the same settings and device, and removed by one with others.

    Args:
        out_dir: the demo's output folder.
        settings: a ``DemoSettings`` (None: the defaults).
        device: where the model runs (e.g. 'cpu', 'cuda').
        overwrite: recompute every stage and replace what is there.
        threads: CPU threads of every stage (``settings.ModelSpec.threads``).

    Raises:
        OutputRefused: a file there that the demo did not write, without ``overwrite``.
    """
    from .runtime import apply_threads

    check_output_folder(out_dir, "out_dir")  # a file, or a path inside one, before the model loads
    cfg = settings or DemoSettings()
    torch.manual_seed(cfg.seed)
    # 'auto' is resolved once, so that every stage runs with the same count (each stage applies it).
    run = DemoRun(out=Path(out_dir), cfg=cfg, loaded=load_model(None, device=device), overwrite=overwrite,
                  threads=str(apply_threads(threads)))
    final = run.out
    with contextlib.ExitStack() as held:
        held.enter_context(claim_output(final, "folder", overwrite))  # held until the replacement is in place
        staging = _staging(run) if overwrite else None
        if staging is not None:
            _claim_outputs(run, True, held)  # the folder's files stay locked while the new run is built aside
            # Everything in the staging folder is this replacement's: it resumes as a plain demo does.
            run.out, run.overwrite, run.figure_claims = staging, False, {}
        with contextlib.ExitStack() as building:
            _claim_outputs(run, run.overwrite, building)
            _run_stages(run)
        if staging is not None:
            _move_into_place(staging, final)
            # The profile's figures are stamped with the Fisher's absolute path, the staging folder's:
            # redrawn (aside, then moved) from the moved Fisher, a later plain demo keeps them.
            run.out, run.overwrite = final, True
            _profile(run)
    return {k: final / v.relative_to(run.out) for k, v in run.paths.items()
            if k in ("fisher", "stability", "profile", "schedule", "figures")}


REPLACEMENT_NOTE = ".demo-replacement.json"  # in a staging folder: what the replacement is built with


def _staging(run: DemoRun) -> Optional[Path]:
    """The staging folder of a replacement of ``run.out`` (None: nothing there to keep, build in place).

    One left by a killed replacement is resumed when its note records this run's settings and
    device, else removed (its stages may hold other numbers).
    """
    out = Path(os.path.abspath(run.out))
    if not out.name or not out.is_dir() or not any(out.iterdir()):
        return None
    staging = staged_path(out)
    note = staging / REPLACEMENT_NOTE
    record = json.loads(json_text({"settings": asdict(run.cfg),
                                   "device": str(next(run.loaded.model.parameters()).device)}))
    if staging.is_dir() and note.is_file():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(note.read_text(encoding="utf-8")) == record:
                print(f"resuming the replacement built in '{staging}'", flush=True)
                return staging
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging)
    elif staging.exists() or staging.is_symlink():
        staging.unlink()
    staging.mkdir(parents=True)
    with atomic_output(note) as tmp:
        tmp.write_text(json_text(record), encoding="utf-8")
    return staging


def _move_into_place(staging: Path, out: Path) -> None:
    """Move the finished replacement's files onto the folder's, then remove the staging folder.

    Hidden files (the note, locks) stay behind.  A kill during the renames (microseconds) leaves
    the note: the next replacement resumes the staging folder, recomputing the stages moved away.
    """
    pairs = [(path, out / path.relative_to(staging)) for path in sorted(staging.rglob("*"))
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(staging).parts)]
    for _, final in pairs:
        final.parent.mkdir(parents=True, exist_ok=True)
    replace_together(pairs)
    shutil.rmtree(staging)


def _run_stages(run: DemoRun):
    for key in ("figures", "directions", "surfaces"):
        run.paths[key].mkdir(parents=True, exist_ok=True)
    for number, stage in enumerate(STAGES, 1):
        prefix = f"[{number}/{len(STAGES)}] {stage.title(run)}"
        outputs = stage.done(run)
        if outputs and all(p.exists() for p in outputs) and not run.overwrite:
            print(f"{prefix}: already done, kept", flush=True)
            continue
        print(f"{prefix} ...", flush=True)
        start = time.perf_counter()
        stage.work(run)
        print(f"{prefix}: done in {time.perf_counter() - start:.0f} s", flush=True)


def _figures(surf_dir, fig_dir, specs_2d, specs_1d, claims):
    """Surface plots, the Figure-1 comparison, the top-k sweep and the random controls, with CSVs.

    ``claims``: {figure file name: its Claim}, whose stamp each figure carries.
    """
    two_d = [surf_dir / f"{name}_2d.h5" for name, _ in specs_2d]
    labels_2d = ["all parameters", "top 50% by Fisher", "bottom 50% by Fisher"]
    for path, (name, _) in zip(two_d, specs_2d):
        for kind in ("surface3d", "contour"):
            figure = f"{kind}_{name}.png"
            plots.plot_surface(path, fig_dir / figure, kind=kind, claim=claims[figure])
    plots.plot_surface(two_d[0], fig_dir / "surface3d_all.html", kind="surface3d", claim=claims["surface3d_all.html"])
    figure = "compare_all_top_bottom.png"
    rows = plots.compare_surfaces(two_d, labels_2d, fig_dir / figure, kind="surface3d", claim=claims[figure])
    print(sharpness.format_table(rows))
    top = [(n, s) for n, s in specs_1d if s.startswith("top")]
    rand = [(n, s) for n, s in specs_1d if s.startswith("random")]
    # The README shows the sweep and its controls side by side: one loss axis for both.
    shared = plots.value_range([surf_dir / f"{n}_1d.h5" for n, _ in top + rand])
    for group, title in ((top, "topk_sweep"), (rand, "random_controls")):
        rows = plots.compare_surfaces([surf_dir / f"{n}_1d.h5" for n, _ in group],
                                       [s.replace(":", " ") + "%" for _, s in group],
                                       fig_dir / f"{title}.png", claim=claims[f"{title}.png"], value_range=shared)
        print(sharpness.format_table(rows))
