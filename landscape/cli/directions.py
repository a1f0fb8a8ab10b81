"""directions: the command line of ``make_directions`` (random, hessian, interpolation, trajectory)."""

import os
from pathlib import Path

from ..settings import DirectionsSettings
from .generated import add_output_arguments, add_settings_arguments, settings_from_args


def register(subparsers):
    parser = subparsers.add_parser(
        "directions", help="filter-normalized, Fisher-masked random directions",
        description="Seeded Gaussian directions, normalized per filter/layer and optionally masked by Fisher "
                    "scores, written to an HDF5 direction file.  --kind hessian: the top-1 (--dims 1) or top-2 "
                    "(--dims 2) Hessian eigenvectors as axes (unit norm), of P·H·P when --fisher/--subset are "
                    "given (--ignore as for random directions; --seed seeds the Lanczos start vector and random "
                    "masks); its sample is set by the corpus options, whose defaults are those of `landscape "
                    "surface`; they, --tol and --device apply to --kind hessian only.  --to and --trajectory write raw "
                    "parameter differences: --norm, --ignore and --fisher do not apply.")
    add_settings_arguments(parser, DirectionsSettings)
    add_output_arguments(parser, "direction file to write (.h5)")
    parser.set_defaults(func=run_directions, applies_threads=True)


def run_directions(args):
    from ..direction_kinds import make

    result = make(settings_from_args(DirectionsSettings, args), out=args.out, overwrite=args.overwrite,
                  progress=not args.quiet, log=lambda line: print(line, flush=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(_summary(result.settings.kind, Path(args.out), result.attributes))
    return 0


def _summary(kind, out, attrs) -> str:
    """What was written, in a line (and a trajectory's checkpoints, one per line)."""
    selected = f"{attrs['n_selected']:,} of {attrs['n_parameters']:,} parameters"
    if kind == "interpolation":
        return (f"wrote {out}: 1 direction from {attrs['model']} (x = 0) to {attrs['to']} (x = 1), "
                f"|θ_B − θ_A| = {attrs['distance']:.4g}")
    if kind == "trajectory":
        explained = attrs["explained_variance"]
        lines = [f"wrote {out}: the PCA plane of {len(attrs['trajectory_labels'])} checkpoints around "
                 f"{attrs['model']} (the surface's --model), explained variance {explained[0]:.1%} + "
                 f"{explained[1]:.1%}"]
        lines += [f"  {label}: ({x:.4g}, {y:.4g})"
                  for label, (x, y) in zip(attrs["trajectory_labels"], attrs["trajectory_coordinates"])]
        return "\n".join(lines)
    if kind == "hessian":
        return (f"wrote {out}: the top-{attrs['dims']} Hessian eigenvector(s) over {selected} (subset "
                f"{attrs['subset']}), eigenvalues {', '.join(f'{v:.6g}' for v in attrs['eigenvalues'])}")
    share = 100.0 * attrs["n_selected"] / max(1, attrs["n_parameters"])
    return (f"wrote {out}: {attrs['dims']} direction(s), norm={attrs['norm']}, subset={attrs['subset']}, "
            f"{selected} perturbed ({share:.2f}%), {out.stat().st_size / 2**20:.1f} MiB")
