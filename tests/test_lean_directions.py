"""Memory-lean directions and surfaces (issue 18): streamed direction files with the same values
as the in-memory API, compact storage, directions held in the model's dtype, old files readable."""

import h5py
import numpy as np
import pytest
import torch

from landscape import directions as D
from landscape import surface as S
from landscape.data.corpus import load_batches
from landscape.errors import UsageError
from landscape.fisher import save_fisher
from landscape.fisher.masks import kth_smallest_key, sortable_keys
from landscape.models import load_model


@pytest.fixture(scope="module")
def embedded():
    """The embedded 4-layer BERT (1.9M parameters): tensors large enough for real compression."""
    return load_model(None, device="cpu")


@pytest.fixture(scope="module")
def fisher_file(embedded, tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=generator) for n, p in embedded.model.named_parameters()}
    path = tmp_path_factory.mktemp("fisher") / "F.safetensors"
    save_fisher(path, scores, {"corpus": "test scores"})
    return path


def _read(path):
    with h5py.File(path, "r") as handle:
        return {g: {n: handle[g][n][()] for n in handle[g]} for g in D.GROUPS if g in handle}


def _stored_bytes(path):
    with h5py.File(path, "r") as handle:
        return sum(handle[g][n].id.get_storage_size() for g in D.GROUPS if g in handle for n in handle[g])


@pytest.mark.parametrize("options", [
    {},
    {"orthogonal": True},
    {"dims": 1, "norm": "layer", "ignore": "none"},
    {"subset": "top:5"},
    {"subset": "random:5", "orthogonal": True},
    {"subset": "bottom:50", "granularity": "tensor"},
])
def test_streamed_file_equals_the_in_memory_directions(embedded, fisher_file, tmp_path, options):
    from landscape.fisher import load_fisher

    model = embedded.model
    options = {"dims": 2, **options}
    fisher = load_fisher(fisher_file)[0] if "subset" in options else None
    dirs, settings = D.make_directions(model, fisher=fisher, **options)
    stamp = D.save_directions(tmp_path / "api.h5", dirs, settings)
    streamed = D.write_directions(tmp_path / "stream.h5", model, fisher=fisher_file if fisher else None, **options)
    assert streamed["fingerprint"] == stamp and streamed["n_selected"] == settings["n_selected"]
    back, attrs = D.load_directions(tmp_path / "stream.h5", model)
    for axis, direction in enumerate(dirs):
        for name, values in direction.items():
            assert torch.equal(back[axis][name], values), name
            assert not bool(torch.signbit(back[axis][name][values == 0]).any())  # +0.0: compressible
    assert attrs["fingerprint"] == stamp and attrs["precision"] == "float32"
    if fisher is not None:
        assert attrs["fisher_provenance"] == "test scores"


def test_masked_directions_are_compact_and_dense_ones_are_not_inflated(embedded, fisher_file, tmp_path):
    model = embedded.model
    dense_float32 = 2 * 4 * sum(p.numel() for p in model.parameters())
    D.write_directions(tmp_path / "top5.h5", model, fisher=fisher_file, subset="top:5")
    D.write_directions(tmp_path / "all.h5", model)
    D.write_directions(tmp_path / "bf16.h5", model, precision="bfloat16")
    assert _stored_bytes(tmp_path / "top5.h5") <= 0.15 * dense_float32
    assert _stored_bytes(tmp_path / "all.h5") <= 1.0 * dense_float32
    # Values exact in bfloat16 take about what bfloat16 itself needs (2 of 4 bytes).
    assert _stored_bytes(tmp_path / "bf16.h5") <= 0.55 * dense_float32
    rounded = _read(tmp_path / "bf16.h5")["xdirection"]
    exact = _read(tmp_path / "all.h5")["xdirection"]
    for name, values in rounded.items():
        assert np.array_equal(values, torch.from_numpy(exact[name]).bfloat16().float().numpy()), name


def test_a_file_written_before_compression_still_reads(tiny_bert, tmp_path):
    """Files of earlier versions: plain float32 datasets, masked zeros as −0.0."""
    model = tiny_bert.model
    dirs, settings = D.make_directions(model, dims=2, seed=1)
    dirs = [{n: t * (torch.arange(t.numel()).reshape(t.shape) % 3 == 0) for n, t in d.items()} for d in dirs]
    with h5py.File(tmp_path / "old.h5", "w") as handle:
        for key, value in settings.items():
            handle.attrs[key] = value
        handle.attrs["fingerprint"] = D.fingerprint(dirs)
        for group, direction in zip(D.GROUPS, dirs):
            for name, values in direction.items():
                handle.create_group(group) if group not in handle else None
                handle[group].create_dataset(name, data=values.numpy())
    back, _ = D.load_directions(tmp_path / "old.h5", model)
    assert all(torch.equal(back[a][n], dirs[a][n]) for a in range(2) for n in dirs[a])


def test_reading_one_axis_still_verifies_the_whole_file(tiny_bert, tmp_path):
    model = tiny_bert.model
    D.write_directions(tmp_path / "d.h5", model)
    x_only, _ = D.load_directions(tmp_path / "d.h5", model, axes=1)
    assert len(x_only) == 1
    with h5py.File(tmp_path / "d.h5", "r+") as handle:  # damage the y direction only
        name = next(n for n in handle["ydirection"] if handle["ydirection"][n].ndim == 2)
        handle["ydirection"][name][0, 0] += 1.0
    with pytest.raises(UsageError, match="damaged"):
        D.load_directions(tmp_path / "d.h5", model, axes=1)


def test_radix_selection_finds_the_kth_smallest_of_awkward_values():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(5000, generator=generator), torch.tensor([0.0, -0.0, float("inf"),
                        -float("inf"), 1e-45, -1e-45, 3.0, 3.0, 3.0])])
    keys = sortable_keys(values)
    ordered = torch.sort(values).values
    for rank in (1, 2, 17, 2500, 5004, 5005, len(values)):
        key, below, equal = kth_smallest_key(lambda: iter(keys.split(777)), rank)
        expected = ordered[rank - 1]
        assert key == int(sortable_keys(expected.reshape(1))[0])
        assert below == int((values < expected).sum()) and equal == int((values == expected).sum())


def test_bfloat16_surface_holds_directions_in_bfloat16_and_says_so(tiny_llama_dir, tiny_corpus_file, tmp_path):
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="bfloat16")
    batches = load_batches(loaded, str(tiny_corpus_file), max_samples=4, seq_len=16, batch_size=4)
    D.write_directions(tmp_path / "d32.h5", loaded.model)
    D.write_directions(tmp_path / "d16.h5", loaded.model, precision="bfloat16")
    xs, ys = [-0.5, 0.0, 0.5], [-0.5, 0.5]
    held = S.compute_surface_file(tmp_path / "held.h5", loaded.model, tmp_path / "d32.h5", batches, xs, ys,
                                  progress=False, kind=loaded.kind)
    streamed = S.compute_surface_file(tmp_path / "streamed.h5", loaded.model, tmp_path / "d32.h5", batches, xs, ys,
                                      progress=False, stream=True, kind=loaded.kind)
    exact16 = S.compute_surface_file(tmp_path / "exact16.h5", loaded.model, tmp_path / "d16.h5", batches, xs, ys,
                                     progress=False, kind=loaded.kind)
    surfaces = {r["path"].stem: S.read_surface(r["path"]) for r in (held, streamed, exact16)}
    assert surfaces["held"].settings["direction_dtype"] == "bfloat16"
    assert "direction_dtype" not in surfaces["streamed"].settings  # float32 directions, as before
    # Streamed float32 directions: the old numbers; held in bf16: the rounded directions' numbers.
    dirs32, _ = D.load_directions(tmp_path / "d32.h5")
    dirs16, _ = D.load_directions(tmp_path / "d16.h5")
    np.testing.assert_array_equal(surfaces["streamed"].z, S.evaluate(loaded.model, dirs32, batches, xs, ys,
                                                                        stream=True, kind=loaded.kind))
    np.testing.assert_array_equal(surfaces["held"].z, surfaces["exact16"].z)
    np.testing.assert_array_equal(surfaces["held"].z, S.evaluate(loaded.model, dirs16, batches, xs, ys,
                                                                 kind=loaded.kind))



def test_bytes_held_beside_a_bfloat16_model(tiny_llama):
    """Held: a bf16 base copy and two bf16 directions (6 bytes per perturbed parameter); streamed:
    the base copy beside the model, the float32 directions in host memory."""
    from landscape.surface.perturbation import InPlacePerturbation

    model = tiny_llama.model.to(torch.bfloat16)
    dirs, _ = D.make_directions(model, dims=2)
    moved = sum(int(d.any()) * d.numel() for d in dirs[0].values())
    for stream, direction_bytes in ((False, 2), (True, 4)):
        perturbation = InPlacePerturbation(model, dirs, stream=stream)
        base = sum(e.base.numel() * e.base.element_size() for e in perturbation.entries)
        held = [p for e in perturbation.entries for p in e.parts]
        assert base == 2 * moved
        assert sum(p.numel() * p.element_size() for p in held) == 2 * direction_bytes * moved
        assert all(p.device.type == "cpu" for p in held) or not stream
