"""landscape: Fisher information, loss landscapes and guided dropout for pretrained language models.

The public namespace (``landscape.__all__``) holds the stage calls, their settings classes and the
readers of the files they write (docs/api.md); the stage packages hold the rest.  The code is laid
out by concern (imports flow one way, from the command line down to the core):

* core: ``errors``, ``files``, ``runtime`` (distribution, logging, precision), ``datahome``, ``hub`` (is
  a hub name worth asking for), ``defaults`` and ``settings`` (shared with ``--help``, so stdlib only),
  ``models``, ``inputs`` (a stage's model and sample), ``results``, ``direction_file``, ``journal`` (the one
  append-only journal of surfaces, Hessian runs and sweeps)
* ``data/``: objectives, corpora, labelled sets, sub-sampling, the embedded texts and model
* ``fisher/``: per-layer rules, the accumulator, runs, the file, stability, masks and subsets
* ``surface/``: directions, perturbation, evaluation, the file and its journal, sharpness
* ``curvature/``: linear operators (the Hessian's, the diagonal Fisher's), Lanczos eigenpairs,
  trace and spectrum on any of them, their checkpoints; a peer of ``surface`` (neither imports
  the other: ``direction_kinds`` and ``critical`` above them combine both)
* ``testing/``: dense references for the tests
* ``plots/``: figures of surfaces
* ``guided/``: dropout sites, profiles, schedules, regularizers, fine-tuning and sweeps
* ``cli/``: the ``landscape`` command line; ``demo``: the whole pipeline as declared stages
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# The public namespace: name -> (module, attribute or None for the module itself).  Imported on
# first use (PEP 562), so that `import landscape` and `landscape --help` stay free of torch.
_PUBLIC = {
    # stage calls, one per command (docs/api.md)
    "run_fisher": ("landscape.fisher.stage", "run_fisher"),
    "run_stability": ("landscape.fisher.stage", "run_stability"),
    "run_profile": ("landscape.guided.profile", "run_profile"),
    "run_schedule": ("landscape.guided.schedule_stage", "run_schedule"),
    "run_surface": ("landscape.surface.run", "run_surface"),
    "make_directions": ("landscape.direction_kinds", "make"),
    "run_hessian": ("landscape.curvature.stage", "run_hessian"),
    "run_critical_sharpness": ("landscape.critical", "run_critical_sharpness"),
    "run_critical_sweep": ("landscape.critical_sweep", "run_critical_sweep"),
    "run_finetune": ("landscape.guided.finetune", "run_finetune"),
    "plot": ("landscape.plots.figures", "plot"),
    "compare": ("landscape.plots.figures", "compare"),
    "run_demo": ("landscape.demo", "run_demo"),
    # settings and results
    "ModelSpec": ("landscape.settings", "ModelSpec"),
    "SampleSpec": ("landscape.settings", "SampleSpec"),
    "GridSpec": ("landscape.settings", "GridSpec"),
    "FisherSettings": ("landscape.settings", "FisherSettings"),
    "StabilitySettings": ("landscape.settings", "StabilitySettings"),
    "ProfileSettings": ("landscape.settings", "ProfileSettings"),
    "ScheduleSettings": ("landscape.settings", "ScheduleSettings"),
    "SurfaceSettings": ("landscape.settings", "SurfaceSettings"),
    "HessianSettings": ("landscape.settings", "HessianSettings"),
    "CriticalSharpnessSettings": ("landscape.settings", "CriticalSharpnessSettings"),
    "FinetuneSettings": ("landscape.settings", "FinetuneSettings"),
    "DirectionsSettings": ("landscape.settings", "DirectionsSettings"),
    "StageResult": ("landscape.results", "StageResult"),
    "UsageError": ("landscape.errors", "UsageError"),
    # readers of the files the stages write, and the inputs they read
    "load_model": ("landscape.models", "load_model"),
    "load_batches": ("landscape.data.corpus", "load_batches"),
    "load_fisher": ("landscape.fisher.file", "load_fisher"),
    "load_directions": ("landscape.direction_file", "load_directions"),
    "read_surface": ("landscape.surface.file", "read_surface"),
    "load_report": ("landscape.curvature.report", "load_report"),
    "load_critical_report": ("landscape.critical", "load_critical_report"),
    "load_schedule": ("landscape.guided.schedule", "load_schedule"),
    "schedule_callback": ("landscape.guided.callback", "callback"),
    "DIRECTION_KINDS": ("landscape.direction_kinds", "KINDS"),
    # the stage modules users script with, by their short names (there is no landscape/corpus.py:
    # `from landscape import corpus` reaches landscape.data.corpus through __getattr__ below)
    "corpus": ("landscape.data.corpus", None),
    "directions": ("landscape.surface.directions", None),
    "schedule": ("landscape.guided.schedule", None),
    "regularizers": ("landscape.guided.regularizers", None),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'landscape' has no attribute '{name}'") from None
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
