"""Hessian curvature: exact products, Lanczos eigenpairs, Hutchinson trace, SLQ density, checkpoints.

The reference is the dense Hessian of a ~1k-parameter GPT-2, computed independently in float64
(``torch.func.hessian`` of a hand-written token-weighted cross-entropy).
"""

import copy
import json
import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

from landscape import curvature as C
from landscape.corpus import load_batches
from landscape.curvature.operator import _attention_configs
from landscape.data import objectives
from landscape.data.objectives import sequence_losses
from landscape.directions import check_directions_match, load_directions, save_directions
from landscape.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ----------------------------------------------------------------------------- the dense reference
def _tiny_gpt2():
    """A 1-layer GPT-2 with hidden 8 and 16 tokens: 1144 parameters (tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than the initializer's: a Hessian with some structure
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _tiny_batches():
    """Two causal batches; the second has padding (label -100), so token weighting matters."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for rows, length in ((3, 10), (2, 7)):
        ids = torch.randint(1, 16, (rows, length), generator=gen)
        labels = ids.clone()
        attention = torch.ones_like(ids)
        if length == 7:
            labels[1, 4:] = -100
            attention[1, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def _dense_hessian(model, batches):
    """(H float64 (n, n), names): Hessian of Σ token CE / Σ tokens over the trainable parameters.

    Forward-over-reverse (``jvp`` of ``grad``) on every unit vector, vmapped: a method independent
    of the operator's double backward.  Not ``torch.func.hessian``: in torch 2.13 its
    reverse-over-reverse half gets LayerNorm weights wrong when the LayerNorm input also depends
    on the parameters (``jacrev(jacrev(f))`` disagrees with finite differences there).
    """
    from torch.func import functional_call, grad, jvp, vmap

    ref = copy.deepcopy(model).double().eval()
    ref.set_attn_implementation("eager")
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [ref.get_parameter(n).shape for n in names]
    flat = torch.cat([ref.get_parameter(n).detach().reshape(-1) for n in names])

    def loss(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[offset: offset + shape.numel()].view(shape)
            offset += shape.numel()
        total, count = 0.0, 0
        for b in batches:
            logits = functional_call(ref, params, (), {"input_ids": b["input_ids"],
                                                       "attention_mask": b["attention_mask"]}).logits
            targets = b["labels"][:, 1:]
            keep = targets != -100
            total = total + torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum")
            count += int(keep.sum())
        return total / count

    def column(e):
        return jvp(grad(loss), (flat,), (e,))[1]

    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    H = torch.cat([vmap(column)(chunk) for chunk in eye.split(384)])
    return ((H + H.T) / 2).detach(), names


@pytest.fixture(scope="module")
def tiny():
    """(model, batches, dense H, flat index of each parameter name)."""
    model, batches = _tiny_gpt2(), _tiny_batches()
    H, names = _dense_hessian(model, batches)
    offsets, start = {}, 0
    for name in names:
        size = model.get_parameter(name).numel()
        offsets[name] = (start, size)
        start += size
    return model, batches, H, offsets


def _flat(direction, offsets):
    return torch.cat([direction[n].reshape(-1).double() for n in offsets])


def _tiny_mask(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters()}
    mask["transformer.ln_f.weight"][:] = False  # a tensor with nothing kept
    return mask


def _dense_projected(H, mask, offsets):
    keep = torch.cat([mask[n].reshape(-1) for n in offsets])
    return H[keep][:, keep], keep


# ----------------------------------------------------------------------------- the operator
def test_products_equal_dense_hessian_with_and_without_cache(tiny):
    model, batches, H, offsets = tiny
    gen = torch.Generator().manual_seed(3)
    with pytest.warns(UserWarning, match="eager"):  # SDPA on CPU has no double backward
        cached = C.HessianOperator(model, batches, kind="causal")
        vs = [torch.randn(cached.dim, generator=gen) for _ in range(3)]
        got = [cached.matvec(v) for v in vs]
    assert cached.dim == H.shape[0] == 1144
    fresh = C.HessianOperator(model, batches, cache_bytes=0, kind="causal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recomputed = fresh.matvec(vs[2])
    for v, hv in zip(vs, got):
        want = H @ v.double()
        assert torch.linalg.norm(hv.double() - want) <= 1e-5 * torch.linalg.norm(want)
    assert torch.allclose(recomputed, got[2], rtol=1e-5, atol=1e-6)


def test_cache_follows_weight_changes(tiny):
    model, batches, _, _ = tiny
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = C.HessianOperator(model, batches, kind="causal")
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(4))
        op.matvec(v)
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
        after = op.matvec(v)
        want = C.HessianOperator(model, batches, cache_bytes=0, kind="causal").matvec(v)
    assert torch.allclose(after, want, rtol=1e-5, atol=1e-6)


def test_mask_restricts_to_projected_hessian(tiny):
    model, batches, H, offsets = tiny
    mask = _tiny_mask(model)
    HP, keep = _dense_projected(H, mask, offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = C.HessianOperator(model, batches, mask=mask, kind="causal")
        assert op.dim == int(keep.sum()) and "transformer.ln_f.weight" not in op.names
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5))
        hv = op.matvec(v).double()
    want = HP @ v.double()
    assert torch.linalg.norm(hv - want) <= 1e-5 * torch.linalg.norm(want)
    full = op.to_dict(v)
    assert not full["transformer.ln_f.weight"].any()
    assert all(not full[n][~mask[n]].any() for n in full)


def test_bad_masks_are_refused(tiny):
    model, batches, _, _ = tiny
    mask = _tiny_mask(model)
    with pytest.raises(UsageError, match="has no tensor"):
        C.HessianOperator(model, batches, mask={k: v for k, v in mask.items() if "wpe" not in k}, kind="causal")
    mask["transformer.wpe.weight"] = mask["transformer.wpe.weight"][:3]
    with pytest.raises(UsageError, match="shape"):
        C.HessianOperator(model, batches, mask=mask, kind="causal")
    with pytest.raises(UsageError, match="no parameter"):
        C.HessianOperator(model, batches, mask={n: torch.zeros(p.shape, dtype=torch.bool)
                                                for n, p in model.named_parameters()}, kind="causal")


# ----------------------------------------------------------------------------- eigenpairs
@pytest.mark.parametrize("masked, ncv", [(False, None), (True, None), (False, 8)])  # ncv 8: restarts
def test_top_eigenpairs_match_dense(tiny, masked, ncv):
    model, batches, H, offsets = tiny
    mask = _tiny_mask(model) if masked else None
    dense = _dense_projected(H, mask, offsets)[0] if masked else H
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vals, vecs, info = C.top_eigenpairs(model, batches, k=3, mask=mask, seed=0, ncv=ncv, return_info=True,
                                            kind="causal")
    assert info.converged and info.products < 200 and (ncv is None or info.products > ncv)
    assert np.all(np.diff(vals) <= 0)
    np.testing.assert_allclose(vals, exact, rtol=1e-4)
    keep = _dense_projected(H, mask, offsets)[1] if masked else slice(None)
    for value, vec in zip(vals, vecs):
        assert set(vec) == {n for n, _ in model.named_parameters()}
        assert all(vec[n].dtype == torch.float32 and vec[n].shape == p.shape for n, p in model.named_parameters())
        v = _flat(vec, offsets)
        assert abs(float(torch.linalg.norm(v)) - 1) < 1e-5
        if masked:
            assert not v[~keep].any()
        v = v[keep]
        residual = torch.linalg.norm(dense @ v - value * v)
        assert residual <= 1e-3 * abs(value)


def test_eigenvectors_are_direction_files(tiny, tmp_path):
    model, batches, _, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vals, vecs = C.top_eigenpairs(model, batches, k=2, seed=1, kind="causal")
    save_directions(tmp_path / "v.h5", vecs, {"kind": "hessian"})
    loaded, _ = load_directions(tmp_path / "v.h5", model)
    check_directions_match(loaded, model)
    assert torch.equal(loaded[0]["transformer.wte.weight"], vecs[0]["transformer.wte.weight"])


def test_eigenpair_arguments_are_checked(tiny):
    model, batches, _, _ = tiny
    with pytest.raises(UsageError, match="at least 1"):
        C.top_eigenpairs(model, batches, k=0, kind="causal")
    with pytest.raises(UsageError, match="only"):
        C.top_eigenpairs(model, batches, k=5000, kind="causal")


# ----------------------------------------------------------------------------- trace and spectrum
def test_hutchinson_trace_within_four_standard_errors(tiny):
    model, batches, H, offsets = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, stderr = C.trace(model, batches, samples=60, seed=0, kind="causal")
        mask = _tiny_mask(model)
        mean_p, stderr_p = C.trace(model, batches, mask=mask, samples=60, seed=0, kind="causal")
    assert stderr > 0 and abs(mean - float(H.trace())) <= 4 * stderr
    HP, _ = _dense_projected(H, mask, offsets)
    assert stderr_p > 0 and abs(mean_p - float(HP.trace())) <= 4 * stderr_p


def test_slq_density_integrates_to_one_with_the_trace_as_mean(tiny):
    model, batches, H, _ = tiny
    runs = 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = C.spectrum(model, batches, runs=runs, steps=25, bins=80, seed=0, kind="causal")
    widths = np.diff(spec.edges)
    assert spec.density.shape == spec.centers.shape == (80,) and spec.edges.shape == (81,)
    assert np.all(spec.density >= 0) and abs(np.sum(spec.density * widths) - 1) < 1e-9
    assert all(abs(w.sum() - 1) < 1e-6 for w in spec.weights)
    eigs = torch.linalg.eigvalsh(H)
    span = float(eigs[-1] - eigs[0])
    assert all(n.min() >= float(eigs[0]) - 1e-4 * span and n.max() <= float(eigs[-1]) + 1e-4 * span
               for n in spec.nodes)
    # Lanczos' top Ritz value from 25 steps is the top eigenvalue already.
    assert abs(max(n.max() for n in spec.nodes) - float(eigs[-1])) <= 1e-3 * span
    # The quadrature mean of a run is its start vector's Rayleigh quotient: a Hutchinson sample / dim.
    dim = H.shape[0]
    exact = float(H.trace()) / dim
    spread = math.sqrt(2 * (float((H ** 2).sum()) - float((H.diagonal() ** 2).sum())) / runs) / dim
    assert abs(spec.ritz_mean - exact) <= 4 * spread
    assert abs(spec.mean() - spec.ritz_mean) <= widths[0]


def test_reported_numbers_are_what_the_dense_hessian_gives(tiny, tmp_path):
    """The report's residuals, trace standard error and spectrum, each checked against the dense H."""
    from landscape.curvature.lanczos import _generator, _random_unit

    model, batches, H, offsets = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = C.hessian_report(model, batches, top=2, trace_samples=60, spectrum_runs=4, steps=12, bins=80,
                                  seed=0, vectors=tmp_path / "v.h5", kind="causal")
    dim = H.shape[0]
    # Residuals: measured by a product on the returned vector, as the dense H measures them (within
    # the float32 product's own error), not Lanczos' estimate (here 50 to 100 times smaller).
    vectors, _ = load_directions(tmp_path / "v.h5")
    for value, vector, got in zip(report["eigenvalues"], vectors, report["eigenpairs"]["residuals"]):
        v = _flat(vector, offsets)
        dense = float(torch.linalg.norm(H @ v - value * v)) / abs(value)
        assert dense / 3 <= got <= 3 * dense, (got, dense)
    assert report["eigenpairs"]["products"] >= 2 + len(report["eigenvalues"])
    # Trace: a Rademacher probe's variance is 2(‖H‖_F² − Σ H_ii²); the reported standard error is
    # the sample estimate of sqrt(that / n), within 30% for n = 60.
    trace = report["trace"]
    exact_sd = math.sqrt(2 * (float((H ** 2).sum()) - float((H.diagonal() ** 2).sum())) / trace["samples"])
    assert 0.7 * exact_sd <= trace["stderr"] <= 1.3 * exact_sd
    assert abs(trace["mean"] - float(H.trace())) <= 4 * trace["stderr"]
    assert trace["per_coordinate"] == pytest.approx(trace["mean"] / dim)
    # Spectrum: run r's Gauss quadrature reproduces the moments z_rᵀ H^p z_r / dim of its own start
    # vector exactly for p <= 2·steps − 1; the broadened density's mean and variance follow.
    spectrum = report["spectrum"]
    assert spectrum["dim"] == dim
    power = torch.eye(dim, dtype=torch.float64)
    moments = []
    for p in range(4):
        for r, (nodes, weights) in enumerate(zip(spectrum["nodes"], spectrum["weights"])):
            z = _random_unit(dim, _generator(0, 3, r), "cpu", rademacher=True).double()
            want = float(z @ power @ z)
            got = float(np.dot(np.asarray(weights), np.asarray(nodes) ** p))
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6 * float(torch.linalg.norm(H)) ** p), (p, r)
        moments.append(np.mean([np.dot(w, np.asarray(n) ** p) for n, w in zip(spectrum["nodes"], spectrum["weights"])]))
        power = power @ H
    edges, density = np.asarray(spectrum["edges"]), np.asarray(spectrum["density"])
    centers, widths = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
    assert np.sum(density * widths) == pytest.approx(1, abs=1e-9)
    mean = np.sum(centers * density * widths)
    variance = np.sum((centers - mean) ** 2 * density * widths)
    assert mean == pytest.approx(moments[1], abs=widths[0])
    # Broadening adds sigma² to the variance; binning adds about width²/12.
    assert variance == pytest.approx(moments[2] - moments[1] ** 2 + spectrum["sigma"] ** 2, rel=0.02)


# ----------------------------------------------------------------------------- model state
def test_weights_mode_attention_and_dtype_restored(tiny):
    model, batches, _, _ = tiny
    model = copy.deepcopy(model).train()
    model.transformer.h[0].attn.eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        C.top_eigenpairs(model, batches, k=1, max_iter=30, kind="causal")
        C.trace(model, batches, samples=2, kind="causal")
    assert [m.training for m in model.modules()] == modes
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())

    half = copy.deepcopy(model).to(torch.bfloat16)
    raw = {n: p.detach().clone() for n, p in half.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        C.trace(half, batches, samples=2, kind="causal")
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, raw[n]) for n, p in half.named_parameters())


def _float64_token_losses(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets


def _fd_hvp(model, batches, v, kind):
    """(g(θ+εv) − g(θ−εv)) / 2ε in float64, the gradient of the same loss (sequence_losses).

    In float64 (sequence_losses' cross-entropy too); T5's RMSNorm still squares in float32, whose
    rounding error divided by ε is what limits ε from below.
    """
    ref = copy.deepcopy(model).double().eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    eps = 2e-3

    def grad_at(sign):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(sign * eps * d.double())
        total, tokens = 0.0, 0.0
        for b in batches:
            s = sequence_losses(ref, b, kind)
            total, tokens = total + s.loss_sum.sum(), tokens + float(s.n_tokens.sum())
        grads = torch.autograd.grad(total / tokens, params, allow_unused=True)
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(sign * eps * d.double())
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])

    with mock.patch.object(objectives, "_token_losses", _float64_token_losses):
        return (grad_at(1) - grad_at(-1)) / (2 * eps)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (3, 12), generator=gen)
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_bert", "tiny_t5", "llama"])
def test_products_match_finite_differences_on_every_architecture(which, request, tiny_corpus_file):
    if which == "llama":
        model, batches = _tiny_llama()
        kind = "causal"
    else:
        loaded = request.getfixturevalue(which)
        model, kind = loaded.model, loaded.kind
        batches = load_batches(loaded, str(tiny_corpus_file), max_samples=4, seq_len=16, batch_size=2)
        if which == "tiny_t5":
            # T5's ReLU makes the gradient only piecewise smooth: among its ~16k units some sit
            # within a finite difference's step of their kink, and the difference quotient then
            # measures the jump.  A smooth activation keeps the test about the Hessian machinery.
            for module in model.modules():
                if hasattr(module, "act") and isinstance(module.act, torch.nn.ReLU):
                    module.act = torch.nn.GELU()
    attention = model.config._attn_implementation
    op = C.HessianOperator(model, batches, kind=kind)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.dim, generator=gen)
    v /= v.norm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hv = op.matvec(v).double()
    messages = [str(w.message) for w in caught]
    if attention == "sdpa" and hv.device.type == "cpu":  # CPU SDPA has no double backward: fallback
        assert any("eager" in m for m in messages), messages
    assert model.config._attn_implementation == attention
    want = _fd_hvp(model, batches, op.space.unflatten(v), kind)
    error = float(torch.linalg.norm(hv - want) / torch.linalg.norm(want))
    assert error <= 2e-3, f"relative error {error:.2e} against finite differences"


# ----------------------------------------------------------------------------- checkpoints
class _Killed(Exception):
    pass


def _kill_after(monkeypatch, products):
    """Make the operator die (as a kill would) after ``products`` more Hessian-vector products."""
    real = C.HessianOperator.matvec
    count = [0]

    def matvec(self, v):
        if count[0] >= products:
            raise _Killed()
        count[0] += 1
        return real(self, v)

    monkeypatch.setattr(C.HessianOperator, "matvec", matvec)
    return lambda: monkeypatch.setattr(C.HessianOperator, "matvec", real)


def test_trace_checkpoint_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    model, batches, _, _ = tiny
    warnings.simplefilter("ignore")
    whole = C.trace(model, batches, samples=8, seed=3, kind="causal")
    path = tmp_path / "trace.jsonl"
    undo = _kill_after(monkeypatch, 5)
    with pytest.raises(_Killed):
        C.trace(model, batches, samples=8, seed=3, checkpoint=path, kind="causal")
    undo()
    with open(path, "a") as handle:
        handle.write('{"i": 6, "val')  # a record cut short by the kill
    assert len(path.read_text().splitlines()) == 7  # header, 5 probes, the partial line
    undo = _kill_after(monkeypatch, 3)  # only the 3 missing probes may be computed
    resumed = C.trace(model, batches, samples=8, seed=3, checkpoint=path, kind="causal")
    undo()
    np.testing.assert_allclose(resumed, whole, rtol=1e-6)
    assert len(path.read_text().splitlines()) == 9
    with pytest.raises(UsageError, match="other settings") as err:
        C.trace(model, batches, samples=8, seed=4, checkpoint=path, kind="causal")
    assert "\n" not in str(err.value) and "seed" in str(err.value)
    (tmp_path / "junk").write_text("not json\n")
    with pytest.raises(UsageError, match="not a Hessian checkpoint"):
        C.trace(model, batches, samples=2, checkpoint=tmp_path / "junk", kind="causal")


def test_spectrum_checkpoint_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    model, batches, _, _ = tiny
    warnings.simplefilter("ignore")
    whole = C.spectrum(model, batches, runs=3, steps=6, bins=20, seed=2, kind="causal")
    path = tmp_path / "slq.jsonl"
    undo = _kill_after(monkeypatch, 9)  # run 0 finished, run 1 half way
    with pytest.raises(_Killed):
        C.spectrum(model, batches, runs=3, steps=6, bins=20, seed=2, checkpoint=path, kind="causal")
    undo()
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [r["i"] for r in records] == [0]
    resumed = C.spectrum(model, batches, runs=3, steps=6, bins=20, seed=2, checkpoint=path, kind="causal")
    for a, b in zip(whole.nodes + whole.weights, resumed.nodes + resumed.weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(whole.density, resumed.density, rtol=1e-4)
    with pytest.raises(UsageError, match="steps"):
        C.spectrum(model, batches, runs=3, steps=7, seed=2, checkpoint=path, kind="causal")


def test_kernels_without_visible_backward_switch_to_eager_up_front(tiny):
    model, batches, H, _ = tiny
    model = copy.deepcopy(model)
    for config in _attention_configs(model):
        config._attn_implementation_internal = "flash_attention_2"  # never run: switched before the forward
    op = C.HessianOperator(model, batches, kind="causal")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning, match="'flash_attention_2' attention may have no second derivative"):
        hv = op.matvec(v)
    assert model.config._attn_implementation == "flash_attention_2"
    want = H @ v.double()
    assert torch.linalg.norm(hv.double() - want) <= 1e-5 * torch.linalg.norm(want)
