"""`landscape export --vtk`: a 2D surface as VTK XML PolyData (.vtp), checked by the format's own
structure and, where the `vtk` package is installed, by VTK's reader."""

import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

from landscape.cli import main
from landscape.plots.vtk import export_vtp

X, Y = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)  # not square: the point order must be right


def loss(X, Y):
    return 2.0 + X ** 2 + 3 * Y + 0.1 * X * Y


def _arrays(path):
    """{(section, name): values} of every DataArray, and the Piece element."""
    piece = ET.parse(path).getroot().find("PolyData/Piece")
    arrays = {}
    for section in piece:
        for array in section.findall("DataArray"):
            values = np.array((array.text or "").split(), dtype=float)
            arrays[(section.tag, array.get("Name"))] = values.reshape(-1, int(array.get("NumberOfComponents", 1)))
    return piece, arrays


@pytest.mark.parametrize("legacy", [False, True])
def test_points_quads_and_values_follow_the_grid(write_surface, tmp_path, legacy):
    path = write_surface("s.h5", loss, x=X, y=Y, legacy=legacy)
    result = export_vtp(path, tmp_path / "s.vtp")
    assert (result["points"], result["polys"]) == (15, 8)
    piece, arrays = _arrays(tmp_path / "s.vtp")
    assert piece.get("NumberOfPoints") == "15" and piece.get("NumberOfPolys") == "8"
    points = arrays[("Points", "Points")]
    grid_x, grid_y = np.meshgrid(X, Y)
    np.testing.assert_array_equal(points[:, 0], grid_x.ravel())
    np.testing.assert_array_equal(points[:, 1], grid_y.ravel())
    np.testing.assert_array_equal(points[:, 2], loss(grid_x, grid_y).ravel())
    np.testing.assert_array_equal(arrays[("PointData", "train_loss")][:, 0], points[:, 2])
    quads = arrays[("Polys", "connectivity")].reshape(-1, 4).astype(int)
    np.testing.assert_array_equal(arrays[("Polys", "offsets")][:, 0], 4 * np.arange(1, 9))
    for quad in quads:  # each quad is one grid cell: corners one x step and one y step apart
        corners = points[quad, :2]
        assert np.allclose(corners[1] - corners[0], [0.5, 0]) and np.allclose(corners[2] - corners[1], [0, 0.5])
        assert np.allclose(corners[3] - corners[0], [0, 0.5])
    assert len({tuple(sorted(q)) for q in quads}) == 8
    np.testing.assert_allclose(arrays[("CellData", "averaged zvalue")][:, 0], points[quads, 2].mean(axis=1))


def test_log_and_zmax_are_the_originals(write_surface, tmp_path):
    path = write_surface("s.h5", loss, x=X, y=Y)
    export_vtp(path, tmp_path / "s.vtp", log=True, zmax=3.0)
    _, arrays = _arrays(tmp_path / "s.vtp")
    raw = loss(*np.meshgrid(X, Y)).ravel()
    np.testing.assert_allclose(arrays[("Points", "Points")][:, 2], np.log(np.minimum(raw, 3.0) + 0.1), rtol=1e-15)
    np.testing.assert_array_equal(arrays[("PointData", "train_loss")][:, 0], raw)  # the value itself, unclipped


def test_incomplete_diverged_1d_and_bad_options_are_one_line(write_surface, tmp_path, capsys):
    def export(path, *extra):
        capsys.readouterr()
        try:
            code = main(["export", "--vtk", str(path), "--out", str(tmp_path / "o.vtp"), *map(str, extra)])
        except SystemExit as stop:  # an option refused while parsing
            code = stop.code
        return code, capsys.readouterr().err

    partial = write_surface("partial.h5", loss, x=X, y=Y, missing=lambda z: z > 3.5)
    diverged = write_surface("inf.h5", lambda X, Y: np.where(X > 0.9, np.inf, loss(X, Y)), x=X, y=Y)
    line = write_surface("line.h5", lambda x: 1 + x ** 2)
    for path, extra, needle in ((partial, (), "not computed yet"), (diverged, (), "give a zmax"),
                                (line, (), "1D surface"), (diverged, ("--zmax", "nan"), "--zmax"),
                                (diverged, ("--zmax", "-1"), "--zmax")):
        code, err = export(path, *extra)
        assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.vtp").exists()
    assert export(diverged, "--zmax", "10")[0] == 0  # clipped: every point has a height
    with h5py.File(diverged, "r") as handle:
        assert np.isinf(handle["train_loss"][()]).sum() == 3
    capsys.readouterr()
    assert main(["export", "--vtk", str(diverged), "--zmax", "10", "--out", str(tmp_path / "o.png")]) == 2
    assert ".vtp" in capsys.readouterr().err
    # its own output is replaced; a file it did not write is not, unless --overwrite
    assert export(diverged, "--zmax", "9")[0] == 0
    (tmp_path / "o.vtp").write_text("<?xml version='1.0'?><notes/>")
    code, err = export(diverged, "--zmax", "9")
    assert code == 2 and "not drawn by landscape" in err and err.count("\n") == 1, err
    assert export(diverged, "--zmax", "9", "--overwrite")[0] == 0


def test_vtk_reads_it_back(write_surface, tmp_path):
    xml_reader = pytest.importorskip("vtkmodules.vtkIOXML", reason="the vtk package is not installed (optional)")
    path = write_surface("s.h5", loss, x=X, y=Y)
    assert main(["export", "--vtk", str(path), "--out", str(tmp_path / "s.vtp"), "--field", "train_loss"]) == 0
    reader = xml_reader.vtkXMLPolyDataReader()
    reader.SetFileName(str(tmp_path / "s.vtp"))
    reader.Update()
    assert reader.GetErrorCode() == 0
    data = reader.GetOutput()
    assert (data.GetNumberOfPoints(), data.GetNumberOfPolys()) == (15, 8)
    assert all(data.GetCell(i).GetCellType() == 9 for i in range(8))  # VTK_QUAD
    raw = loss(*np.meshgrid(X, Y)).ravel()
    assert data.GetBounds() == pytest.approx((-1, 1, -0.5, 0.5, raw.min(), raw.max()))
    scalars = data.GetPointData().GetArray("train_loss")
    np.testing.assert_array_equal([scalars.GetValue(i) for i in range(15)], raw)
