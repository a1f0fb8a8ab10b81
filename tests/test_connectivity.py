"""Paths between checkpoints: the interpolation direction and the PCA plane of a trajectory."""

import copy

import pytest
import torch

from landscape import directions, surface
from landscape.data.corpus import load_batches
from landscape.errors import UsageError


def test_interpolation_surface_gives_a_at_0_and_b_at_1(tiny_gpt2, tiny_corpus_file):
    model_a = tiny_gpt2.model
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = load_batches(tiny_gpt2, str(tiny_corpus_file), max_samples=4, seq_len=16, batch_size=4)
    d = directions.interpolation_direction(model_a, model_b)
    z = surface.evaluate(model_a, [d], batches, [0.0, 0.5, 1.0], kind=tiny_gpt2.kind)
    loss_a, _ = surface.loss_and_accuracy(model_a, batches, tiny_gpt2.kind)
    loss_b, _ = surface.loss_and_accuracy(model_b, batches, tiny_gpt2.kind)
    assert z[0] == pytest.approx(loss_a, rel=1e-6)
    assert z[2] == pytest.approx(loss_b, rel=1e-5)


def test_interpolation_refuses_another_model(tiny_gpt2, tiny_bert):
    with pytest.raises(UsageError, match="share no parameter"):
        directions.interpolation_direction(tiny_gpt2.model, tiny_bert.model)


def test_trajectory_plane_recovers_a_planar_path():
    torch.manual_seed(0)
    final = {"w": torch.randn(30, 4), "b": torch.randn(7)}
    u, v = torch.randn(127, dtype=torch.float64), torch.randn(127, dtype=torch.float64)
    coefficients = [(3.0, 1.0), (2.0, -1.5), (1.0, 0.5), (0.5, 0.2), (0.0, 0.0)]

    def point(a, b):
        flat = torch.cat([final["w"].reshape(-1), final["b"]]).double() + a * u + b * v
        return {"w": flat[:120].reshape(30, 4).float(), "b": flat[120:].float()}

    dirs, explained, coords = directions.trajectory_directions([point(a, b) for a, b in coefficients])
    assert len(dirs) == 2 and sum(explained) == pytest.approx(1.0, abs=1e-5)
    for d in dirs:
        norm = torch.sqrt(sum(t.double().pow(2).sum() for t in d.values()))
        assert float(norm) == pytest.approx(1.0, abs=1e-5)
    assert coords[-1] == (0.0, 0.0)
    # Each checkpoint is reproduced from its coordinates in the plane (the path lies in it).
    for (x, y), (a, b) in zip(coords, coefficients):
        rebuilt = x * torch.cat([dirs[0]["w"].reshape(-1), dirs[0]["b"]]).double() \
            + y * torch.cat([dirs[1]["w"].reshape(-1), dirs[1]["b"]]).double()
        assert torch.allclose(rebuilt, a * u + b * v, atol=1e-4)


def test_trajectory_needs_four_checkpoints():
    ckpt = {"w": torch.zeros(2, 2)}
    with pytest.raises(UsageError, match="at least 4"):
        directions.trajectory_directions([ckpt, ckpt, ckpt])
