"""A 2D surface as VTK XML PolyData (``.vtp``) for ParaView, as the original code's ``h52vtp.py``.

Points: one per grid point, (x, y, z) with z the field's value, clipped to ``zmax`` and with
``log`` the original's ``ln(value + 0.1)``.  Polys: one quad per grid cell.  Point data:
``zvalue`` (the z coordinate, the original's name) and the field itself, unclipped; cell data:
``averaged zvalue`` (the mean z of each quad's corners, as the original).  ASCII, float64, so that
the numbers are the file's numbers.  The original assumes a square grid; any ny × nx grid works
here.  Its ``--interp`` (a cubic resampling) is left out: it draws values that were never measured.
"""

import os
from pathlib import Path

import numpy as np

from .. import checks
from ..errors import UsageError
from ..files import atomic_output, check_distinct_paths
from ..outputs import claim_output
from ..surface.file import read_surface

LOG_OFFSET = 0.1  # the original's ln(z + 0.1): finite at a loss of 0


def surface_points(path, field="train_loss", log=False, zmax=None):
    """The points of a 2D surface, flat in row-major (ny, nx) order; z as the .vtp draws it.

    Args:
        path: surface file (ours or the original code's layout).
        field: train_loss | train_acc | test_loss | test_acc.
        log: z = ln(value + 0.1) after clipping, as the original's ``--log``.
        zmax: clip values above this (finite, > 0) before the log; None: no clipping.

    Returns:
        (x, y, z, raw, (ny, nx)): four float64 arrays of ny * nx values, and the grid's shape.

    Raises:
        UsageError: a 1D surface, points not computed yet, values that are not finite without
            ``zmax`` (a loss that diverged is +inf), or a bad ``zmax``.
    """
    zmax = checks.optional(checks.positive_float, zmax, "zmax")
    surface = read_surface(path, field)
    if surface.dims != 2:
        raise UsageError(f"'{path}' is a 1D surface; a .vtp export needs a 2D one (a grid of quads)")
    raw = surface.z
    pending = int(np.isnan(raw).sum())
    if pending:
        raise UsageError(f"'{path}' has {pending} point(s) not computed yet; finish it with 'landscape surface' "
                         "(rerun the same command) before exporting it")
    z = raw if zmax is None else np.minimum(raw, zmax)
    if not np.isfinite(z).all():
        raise UsageError(f"'{path}': {field} diverged (+inf) at {int((~np.isfinite(z)).sum())} point(s); "
                         "give a zmax to clip it")
    if log:
        z = np.log(z + LOG_OFFSET)
    X, Y = np.meshgrid(surface.x, surface.y)
    return X.ravel(), Y.ravel(), z.ravel(), raw.ravel(), raw.shape


def quads(ny, nx):
    """Connectivity of the grid's cells: (ny-1)(nx-1) rows of 4 point indices.

    Counter-clockwise seen from +z (x fastest, as the points are ordered), as the original writes them.
    """
    iy, ix = np.meshgrid(np.arange(ny - 1), np.arange(nx - 1), indexing="ij")
    k = (iy * nx + ix).ravel()
    return np.stack([k, k + 1, k + nx + 1, k + nx], axis=1)


def _array(name, values, kind="Float64", components=1):
    """One ASCII DataArray.

    Its RangeMin/RangeMax are of the values, or of the tuples' lengths (several components), as VTK
    defines them.
    """
    values = np.asarray(values)
    number = (lambda v: repr(float(v))) if kind.startswith("Float") else (lambda v: str(int(v)))
    text = " ".join(number(v) for v in values.ravel())
    span = np.linalg.norm(values, axis=1) if components > 1 else values
    return (f'        <DataArray type="{kind}" Name="{name}" NumberOfComponents="{components}" format="ascii" '
            f'RangeMin="{number(span.min())}" RangeMax="{number(span.max())}">\n'
            f"          {text}\n        </DataArray>\n")


def export_vtp(path, out, field="train_loss", log=False, zmax=None, overwrite=False):
    """Write the 2D surface ``path`` to ``out`` as VTK XML PolyData (see the module docstring).

    Args:
        path: surface file.
        out: the .vtp file, written atomically.
        field: the dataset to export (as ``surface_points``).
        log: z = ln(value + 0.1) (as ``surface_points``).
        zmax: clip values above this, or None (as ``surface_points``).
        overwrite: replace an ``out`` that export did not write from this surface.

    Returns:
        {'path', 'points', 'polys'}.

    Raises:
        UsageError: a bad surface or setting; ``OutputRefused`` for an ``out`` export did not
            write unless ``overwrite``; ``OutputBusy`` when another process writes it.
    """
    check_distinct_paths({"out": out}, {"path": path})
    settings = {"command": "export", "inputs": [os.path.abspath(path)]}
    with claim_output(out, "figure", overwrite=overwrite, settings=settings) as claim:
        return _write_vtp(path, out, field, log, zmax, claim)


def _write_vtp(path, out, field, log, zmax, claim):
    x, y, z, raw, (ny, nx) = surface_points(path, field, log, zmax)
    cells = quads(ny, nx)
    cell_z = z[cells].mean(axis=1)
    offsets = 4 * np.arange(1, len(cells) + 1)
    empty = ('        <DataArray type="Int64" Name="connectivity" format="ascii"></DataArray>\n'
             '        <DataArray type="Int64" Name="offsets" format="ascii"></DataArray>\n')
    # The claim's stamp (``outputs``), in a comment: a later run knows the file as its own.
    stamp = next(iter(claim.figure_metadata("svg").values()))
    parts = [
        '<?xml version="1.0"?>\n', f"<!-- {stamp} -->\n",
        '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n',
        "  <PolyData>\n",
        f'    <Piece NumberOfPoints="{len(z)}" NumberOfVerts="0" NumberOfLines="0" NumberOfStrips="0" '
        f'NumberOfPolys="{len(cells)}">\n',
        '      <PointData Scalars="zvalue">\n', _array("zvalue", z), _array(field, raw), "      </PointData>\n",
        '      <CellData Scalars="averaged zvalue">\n', _array("averaged zvalue", cell_z), "      </CellData>\n",
        "      <Points>\n", _array("Points", np.stack([x, y, z], axis=1), components=3), "      </Points>\n",
        "      <Verts>\n", empty, "      </Verts>\n", "      <Lines>\n", empty, "      </Lines>\n",
        "      <Strips>\n", empty, "      </Strips>\n",
        "      <Polys>\n", _array("connectivity", cells, "Int64"), _array("offsets", offsets, "Int64"),
        "      </Polys>\n",
        "    </Piece>\n", "  </PolyData>\n", "</VTKFile>\n",
    ]
    with atomic_output(out) as tmp:
        tmp.write_text("".join(parts), encoding="ascii")
    return {"path": Path(out), "points": len(z), "polys": len(cells)}
