"""Directions: filter normalization per architecture, Fisher masks, direction files, CLI errors."""

import contextlib
import io

import h5py
import pytest
import torch

from landscape import directions as D
from landscape.errors import UsageError
from landscape.fisher import save_fisher


def _filter_norms(t, axis):
    t = t.movedim(axis, 0)
    return t.reshape(t.shape[0], -1).norm(dim=1)


def test_filter_norms_match_weights_bert(tiny_bert):
    model = tiny_bert.model
    d = D.random_direction(model, seed=3, norm="filter")
    params = dict(model.named_parameters())
    linear = "bert.encoder.layer.0.attention.self.query.weight"
    embedding = "bert.embeddings.word_embeddings.weight"
    for name in (linear, embedding):
        assert torch.allclose(_filter_norms(d[name], 0), _filter_norms(params[name].detach(), 0), rtol=1e-4)
    # 1-D tensors (biases, LayerNorm) are not perturbed by default
    assert not d["bert.encoder.layer.0.attention.self.query.bias"].any()
    assert not d["bert.embeddings.LayerNorm.weight"].any()


def test_filter_norms_match_weights_gpt2_conv1d_columns(tiny_gpt2):
    model = tiny_gpt2.model
    d = D.random_direction(model, seed=0, norm="filter")
    params = dict(model.named_parameters())
    conv = "transformer.h.0.attn.c_attn.weight"  # Conv1D (in, out): a filter is a column
    assert type(model.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D"
    assert torch.allclose(_filter_norms(d[conv], 1), _filter_norms(params[conv].detach(), 1), rtol=1e-4)
    assert not torch.allclose(_filter_norms(d[conv], 0), _filter_norms(params[conv].detach(), 0), rtol=1e-2)
    wte = "transformer.wte.weight"
    assert torch.allclose(_filter_norms(d[wte], 0), _filter_norms(params[wte].detach(), 0), rtol=1e-4)
    assert "lm_head.weight" not in d  # tied to wte: perturbed once


def test_layer_norm_none_and_ignore_none(tiny_bert):
    model = tiny_bert.model
    params = dict(model.named_parameters())
    name = "bert.encoder.layer.1.output.dense.weight"
    layer = D.random_direction(model, norm="layer")
    assert torch.allclose(layer[name].norm(), params[name].detach().norm(), rtol=1e-5)
    raw = D.random_direction(model, norm="none")
    filt = D.random_direction(model, norm="filter")
    # same seed, same Gaussian draw: filter normalization only rescales rows
    ratio = filt[name] / raw[name]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    keep = D.random_direction(model, norm="filter", ignore="none")
    bias = "bert.encoder.layer.1.output.dense.bias"
    assert torch.equal(keep[bias], params[bias].detach())
    assert torch.equal(keep[name], filt[name])


def test_directions_are_seeded_and_independent(tiny_bert):
    model = tiny_bert.model
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    a = D.random_direction(model, seed=1)[name]
    assert torch.equal(a, D.random_direction(model, seed=1)[name])
    assert not torch.allclose(a, D.random_direction(model, seed=2)[name])
    assert not torch.allclose(a, D.random_direction(model, seed=1, index=1)[name])


def _scores():
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.rand(10, 20, generator=gen), "b": torch.rand(50, generator=gen),
            "c": torch.rand(7, 3, generator=gen)}


@pytest.mark.parametrize("percent", [0.5, 5, 37.5, 100])
def test_mask_sizes_and_ordering_are_exact(percent):
    scores = _scores()
    total = sum(t.numel() for t in scores.values())
    expected = max(1, round(percent / 100 * total))
    flat = torch.cat([t.reshape(-1) for t in scores.values()])
    top = D.fisher_mask(scores, f"top:{percent}")
    bottom = D.fisher_mask(scores, f"bottom:{percent}")
    rand = D.fisher_mask(scores, f"random:{percent}", seed=4)
    sel = lambda m: torch.cat([m[n].reshape(-1) for n in scores])  # noqa: E731
    assert int(sel(top).sum()) == int(sel(bottom).sum()) == int(sel(rand).sum()) == expected
    if percent < 100:
        assert flat[sel(top)].min() >= flat[~sel(top)].max()
        assert flat[sel(bottom)].max() <= flat[~sel(bottom)].min()
    assert all(top[n].shape == scores[n].shape and top[n].dtype == torch.bool for n in scores)


def test_mask_ties_keep_exact_count_and_random_is_seeded():
    scores = {"w": torch.ones(10, 10), "v": torch.cat([torch.zeros(50), torch.ones(50)])}
    for spec in ("top:5", "top:30", "bottom:30", "bottom:75"):
        mask = D.fisher_mask(scores, spec)
        assert sum(int(m.sum()) for m in mask.values()) == round(float(spec.split(":")[1]) / 100 * 200)
    r1, r2 = D.fisher_mask(scores, "random:10", seed=1), D.fisher_mask(scores, "random:10", seed=1)
    r3 = D.fisher_mask(scores, "random:10", seed=2)
    assert all(torch.equal(r1[n], r2[n]) for n in scores)
    assert not all(torch.equal(r1[n], r3[n]) for n in scores)


def test_mask_ties_are_broken_by_position_as_documented():
    # The first tied elements (in named_parameters order, then row-major) are the ones selected,
    # so that the same Fisher file always gives the same mask: exactly a stable sort's first K.
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        flat = torch.randint(0, 4, (97,), generator=gen).float()
        flat[torch.rand(97, generator=gen) < 0.1] = float("inf") if trial % 2 else -float("inf")
        scores = {"a": flat[:40].reshape(8, 5), "b": flat[40:]}
        for kind in ("top", "bottom"):
            for percent in (1, 30, 50, 99):
                mask = D.fisher_mask(scores, f"{kind}:{percent}")
                got = torch.cat([mask["a"].reshape(-1), mask["b"]])
                order = torch.sort(flat, descending=(kind == "top"), stable=True).indices
                expected = torch.zeros(97, dtype=torch.bool)
                expected[order[: round(percent / 100 * 97)]] = True
                assert torch.equal(got, expected), (trial, kind, percent)


def test_mask_per_tensor_granularity_and_names():
    scores = _scores()
    per = D.fisher_mask(scores, "top:50", granularity="tensor")
    for name, t in scores.items():
        assert int(per[name].sum()) == round(0.5 * t.numel())
        assert t[per[name]].min() >= t[~per[name]].max()
    only = D.fisher_mask(scores, "top:10", names=["a", "c"])
    assert not only["b"].any()
    assert int(only["a"].sum() + only["c"].sum()) == round(0.1 * (200 + 21))
    assert all(m.all() for m in D.fisher_mask(scores, "all").values())


@pytest.mark.parametrize("spec", ["top:0", "top:-5", "bottom:100.5", "random:abc", "middle:5", "top"])
def test_bad_mask_spec_is_a_usage_error(spec):
    with pytest.raises(UsageError):
        D.fisher_mask(_scores(), spec)


def test_apply_mask_after_normalization_and_mismatch(tiny_bert):
    model = tiny_bert.model
    fisher = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    d = D.random_direction(model)
    mask = D.fisher_mask(fisher, "top:10", names=D.perturbable_names(model))
    masked = D.apply_mask(d, mask)
    for name in d:
        assert torch.equal(masked[name], d[name] * mask[name])  # normalized values kept where selected
    bad = dict(mask)
    bad["bert.encoder.layer.0.output.dense.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(UsageError, match="bert.encoder.layer.0.output.dense.weight"):
        D.apply_mask(d, bad)


def test_orthogonalized_second_direction(tiny_bert):
    dirs, _ = D.make_directions(tiny_bert.model, dims=2, orthogonal=True)
    dot = sum(float((dirs[0][n].double() * dirs[1][n].double()).sum()) for n in dirs[0])
    norm = sum(float(dirs[0][n].double().norm() ** 2) for n in dirs[0]) ** 0.5
    assert abs(dot) < 1e-5 * norm ** 2


def test_direction_file_round_trip_and_wrong_model(tiny_bert, tiny_gpt2, tmp_path):
    dirs, settings = D.make_directions(tiny_bert.model, dims=2, seed=5)
    path = tmp_path / "d.h5"
    stamp = D.save_directions(path, dirs, settings)
    loaded, attrs = D.load_directions(path, tiny_bert.model)
    assert attrs["fingerprint"] == stamp and attrs["norm"] == "filter" and attrs["seed"] == 5
    assert all(torch.equal(loaded[i][n], dirs[i][n]) for i in range(2) for n in dirs[i])
    with h5py.File(path) as handle:
        assert set(handle) == {"xdirection", "ydirection"}
        assert set(handle["xdirection"]) == {n for n, _ in tiny_bert.model.named_parameters()}
    with pytest.raises(UsageError, match="transformer.wte.weight"):
        D.load_directions(path, tiny_gpt2.model)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(UsageError, match="not a direction file"):
        D.load_directions(junk)
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle.create_dataset("train_loss", data=[1.0])
    with pytest.raises(UsageError, match="not a direction file"):
        D.load_directions(tmp_path / "other.h5")


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _cli(*args):
    """Run the CLI in this process (fast); returns its exit code and stderr."""
    from landscape.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code
    return _Result(code, err.getvalue())


def test_cli_directions_with_fisher_subset(tiny_bert, tiny_bert_dir, tmp_path):
    fisher = {n: torch.rand(p.shape) + 0.1 for n, p in tiny_bert.model.named_parameters()}
    save_fisher(tmp_path / "F.safetensors", fisher, {"model": "tiny"})
    out = tmp_path / "d.h5"
    run = _cli("directions", "--model", tiny_bert_dir, "--fisher", tmp_path / "F.safetensors",
               "--subset", "random:5", "--dims", "1", "--out", out)
    assert run.returncode == 0, run.stderr
    dirs, attrs = D.load_directions(out, tiny_bert.model)
    n_perturbable = sum(p.numel() for n, p in tiny_bert.model.named_parameters() if p.dim() > 1)
    assert len(dirs) == 1 and attrs["subset"] == "random:5"
    assert attrs["n_selected"] == round(0.05 * n_perturbable)
    # (a selected element can still be 0: BERT's padding embedding row has norm 0)
    assert 0.9 * attrs["n_selected"] < sum(int((t != 0).sum()) for t in dirs[0].values()) <= attrs["n_selected"]

    bad = _cli("directions", "--model", tiny_bert_dir, "--fisher", tmp_path / "F.safetensors",
               "--subset", "top:150", "--out", tmp_path / "bad.h5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "(0, 100]" in bad.stderr
    assert not (tmp_path / "bad.h5").exists()
    nofisher = _cli("directions", "--model", tiny_bert_dir, "--subset", "top:5", "--out", tmp_path / "bad.h5")
    assert nofisher.returncode == 2 and "--fisher" in nofisher.stderr
