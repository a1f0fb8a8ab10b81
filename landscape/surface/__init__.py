"""Loss surfaces: the loss of a model perturbed along 1 or 2 directions, on a grid.

Modules: ``directions`` (filter-normalized, Fisher-masked directions and their file),
``perturbation`` (weights moved in place and restored), ``evaluation`` (the loss at grid points),
``file`` (the contract's HDF5 file, its writer, the one reader), ``journal`` (what a resume must
match, and the per-point journal), ``run``
(``compute_surface_file``; ``run_surface``, the stage: model and sample loaded from a spec),
``sharpness`` (numbers read off a surface).

``from landscape import surface`` gives the entry points below.
"""

from .evaluation import evaluate, evaluate_points, grid_points, loss_and_accuracy, parse_range
from .file import FIELDS, Surface, SurfaceFile, journal_path, read_surface, sample_fingerprint, write_surface
from .perturbation import InPlacePerturbation
from .run import compute_surface_file, run_surface

__all__ = ["FIELDS", "InPlacePerturbation", "Surface", "SurfaceFile", "compute_surface_file", "evaluate",
           "evaluate_points", "grid_points", "journal_path", "loss_and_accuracy", "parse_range", "read_surface",
           "run_surface", "sample_fingerprint", "write_surface"]
