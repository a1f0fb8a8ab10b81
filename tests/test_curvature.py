"""Hessian curvature: exact products, Lanczos eigenpairs, Hutchinson trace, SLQ density, checkpoints.

The reference is the dense Hessian of a ~1k-parameter GPT-2, computed independently in float64
(``landscape.testing.dense``: forward-over-reverse products of a hand-written token-weighted
cross-entropy), and plain symmetric matrices of known spectrum: the estimators take any operator.
"""

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

from landscape import curvature as C
from landscape.curvature.operator import _attention_configs
from landscape.data.corpus import load_batches
from landscape.errors import UsageError
from landscape.surface.directions import check_directions_match, load_directions, save_directions
from landscape.testing.dense import dense_hessian, finite_difference_hvp, masked_submatrix, symmetric_matrix

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


@pytest.fixture(scope="module")
def tiny():
    """(model, batches, dense H, flat index of each parameter name)."""
    model, batches = _tiny_gpt2(), _tiny_batches()
    H, names = dense_hessian(model, batches)
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
    return masked_submatrix(H, mask, list(offsets))


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
        op = C.HessianOperator(model, batches, mask, "causal")
        vals, rows, info = C.top_eigenpairs(op, k=3, seed=0, ncv=ncv, return_info=True)
    vecs = [op.to_dict(v) for v in rows]
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
        op = C.HessianOperator(model, batches, kind="causal")
        vals, rows = C.top_eigenpairs(op, k=2, seed=1)
    vecs = [op.to_dict(v) for v in rows]
    save_directions(tmp_path / "v.h5", vecs, {"kind": "hessian"})
    loaded, _ = load_directions(tmp_path / "v.h5", model)
    check_directions_match(loaded, model)
    assert torch.equal(loaded[0]["transformer.wte.weight"], vecs[0]["transformer.wte.weight"])


def test_eigenpair_arguments_are_checked(tiny):
    model, batches, _, _ = tiny
    op = C.HessianOperator(model, batches, kind="causal")
    with pytest.raises(UsageError, match="at least 1"):
        C.top_eigenpairs(op, k=0)
    with pytest.raises(UsageError, match="only"):
        C.top_eigenpairs(op, k=5000)


# ----------------------------------------------------------------------------- trace and spectrum
def test_hutchinson_trace_within_four_standard_errors(tiny):
    model, batches, H, offsets = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, stderr = C.trace(C.HessianOperator(model, batches, kind="causal"), samples=60, seed=0)
        mask = _tiny_mask(model)
        mean_p, stderr_p = C.trace(C.HessianOperator(model, batches, mask, "causal"), samples=60, seed=0)
    assert stderr > 0 and abs(mean - float(H.trace())) <= 4 * stderr
    HP, _ = _dense_projected(H, mask, offsets)
    assert stderr_p > 0 and abs(mean_p - float(HP.trace())) <= 4 * stderr_p


def test_slq_density_integrates_to_one_with_the_trace_as_mean(tiny):
    model, batches, H, _ = tiny
    runs = 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = C.spectrum(C.HessianOperator(model, batches, kind="causal"), runs=runs, steps=25, bins=80, seed=0)
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
        C.top_eigenpairs(C.HessianOperator(model, batches, kind="causal"), k=1, max_iter=30)
        C.trace(C.HessianOperator(model, batches, kind="causal"), samples=2)
    assert [m.training for m in model.modules()] == modes
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())

    half = copy.deepcopy(model).to(torch.bfloat16)
    raw = {n: p.detach().clone() for n, p in half.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        C.trace(C.HessianOperator(half, batches, kind="causal"), samples=2)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, raw[n]) for n, p in half.named_parameters())


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
    want = finite_difference_hvp(model, batches, op.space.unflatten(v), kind)
    error = float(torch.linalg.norm(hv - want) / torch.linalg.norm(want))
    assert error <= 2e-3, f"relative error {error:.2e} against finite differences"


# ----------------------------------------------------------------------------- checkpoints
class _Killed(Exception):
    pass


def _kill_after(monkeypatch, products):
    """Make the operator die (as a kill would) after ``products`` more Hessian-vector products.

    Both ways of forming one count: ``matvec`` (Lanczos) and ``quadratic`` (Hutchinson's probes).
    """
    real = {name: getattr(C.HessianOperator, name) for name in ("matvec", "quadratic")}
    count = [0]

    def counted(name):
        def product(self, v):
            if count[0] >= products:
                raise _Killed()
            count[0] += 1
            return real[name](self, v)
        return product

    for name in real:
        monkeypatch.setattr(C.HessianOperator, name, counted(name))
    return lambda: [monkeypatch.setattr(C.HessianOperator, name, function) for name, function in real.items()]


def test_trace_checkpoint_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    model, batches, _, _ = tiny
    warnings.simplefilter("ignore")
    op = C.HessianOperator(model, batches, kind="causal")
    whole = C.trace(op, samples=8, seed=3)
    path = tmp_path / "trace.jsonl"
    undo = _kill_after(monkeypatch, 5)
    with pytest.raises(_Killed):
        C.trace(op, samples=8, seed=3, checkpoint=path)
    undo()
    with open(path, "a") as handle:
        handle.write('{"i": 6, "val')  # a record cut short by the kill
    assert len(path.read_text().splitlines()) == 7  # header, 5 probes, the partial line
    undo = _kill_after(monkeypatch, 3)  # only the 3 missing probes may be computed
    resumed = C.trace(op, samples=8, seed=3, checkpoint=path)
    undo()
    np.testing.assert_allclose(resumed, whole, rtol=1e-6)
    assert len(path.read_text().splitlines()) == 9
    with pytest.raises(UsageError, match="other settings") as err:
        C.trace(op, samples=8, seed=4, checkpoint=path)
    assert "\n" not in str(err.value) and "seed" in str(err.value)
    (tmp_path / "junk").write_text("not json\n")
    with pytest.raises(UsageError, match="not a Hessian checkpoint"):
        C.trace(op, samples=2, checkpoint=tmp_path / "junk")


def test_spectrum_checkpoint_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    model, batches, _, _ = tiny
    warnings.simplefilter("ignore")
    op = C.HessianOperator(model, batches, kind="causal")
    whole = C.spectrum(op, runs=3, steps=6, bins=20, seed=2)
    path = tmp_path / "slq.jsonl"
    undo = _kill_after(monkeypatch, 9)  # run 0 finished, run 1 half way
    with pytest.raises(_Killed):
        C.spectrum(op, runs=3, steps=6, bins=20, seed=2, checkpoint=path)
    undo()
    records = [json.loads(line.rsplit(" ", 1)[0]) for line in path.read_text().splitlines()[1:]]  # less its CRC
    assert [r["i"] for r in records] == [0]
    resumed = C.spectrum(op, runs=3, steps=6, bins=20, seed=2, checkpoint=path)
    for a, b in zip(whole.nodes + whole.weights, resumed.nodes + resumed.weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(whole.density, resumed.density, rtol=1e-4)
    with pytest.raises(UsageError, match="steps"):
        C.spectrum(op, runs=3, steps=7, seed=2, checkpoint=path)


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


def test_sdpa_falls_back_to_eager_before_any_second_backward(tiny, monkeypatch):
    """CPU SDPA's missing second derivative is found in the recorded graph, not by a failing product."""
    model, batches, H, _ = tiny
    model = copy.deepcopy(model)
    assert model.config._attn_implementation == "sdpa"
    op = C.HessianOperator(model, batches, kind="causal")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(6))
    attention = []  # the model's attention as each second backward began
    second = C.HessianOperator._second

    def observed(self, *args, **kwargs):
        attention.append(model.config._attn_implementation)
        return second(self, *args, **kwargs)

    monkeypatch.setattr(C.HessianOperator, "_second", observed)
    with pytest.warns(UserWarning, match="'sdpa' attention has no second derivative"):
        hv = op.matvec(v)
        form = op.quadratic(v)
    assert attention == ["eager", "eager"]  # the old first product ran one with SDPA's graph, which failed
    assert model.config._attn_implementation == "sdpa"
    want = H @ v.double()
    assert torch.linalg.norm(hv.double() - want) <= 1e-5 * torch.linalg.norm(want)
    assert form == pytest.approx(float(v.double() @ want), rel=1e-5)


def test_undifferentiable_counts_only_nodes_a_backward_to_the_coordinates_runs():
    from landscape.curvature.routes import undifferentiable

    gen = torch.Generator().manual_seed(0)
    attended = torch.randn(1, 2, 3, 4, generator=gen).requires_grad_()
    other = torch.randn(5, generator=gen).requires_grad_()
    out = torch.nn.functional.scaled_dot_product_attention(attended, attended, attended)  # CPU: no double backward
    loss = out.square().sum() + other.pow(3).sum()
    grads = torch.autograd.grad(loss, [attended, other], create_graph=True)
    assert undifferentiable(grads, [attended]) == "ScaledDotProductFlashAttentionForCpuBackward0"
    assert undifferentiable(grads, [other]) == ""  # the engine never runs SDPA's node for it
    torch.autograd.grad(grads[1], other, torch.ones(5))  # ... as this second backward shows
    with pytest.raises(RuntimeError, match="derivative for"):
        torch.autograd.grad(grads[0], attended, torch.ones_like(attended))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(attended, attended, attended)
    assert undifferentiable(torch.autograd.grad(out.square().sum(), [attended], create_graph=True), [attended]) == ""


# ----------------------------------------------------------------------------- any operator
KNOWN = [5.0, 3.0, 2.5, 1.0, 0.5, 0.25, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0]  # λ₁ = 5, trace 1.75


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_estimators_on_a_plain_symmetric_matrix_of_known_spectrum(dtype):
    A = symmetric_matrix(KNOWN, seed=4, dtype=dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    vals, vecs, info = C.top_eigenpairs(A, k=3, seed=0, tol=tol, return_info=True)
    assert info.converged and vecs.shape == (3, len(KNOWN)) and vecs.dtype == dtype
    np.testing.assert_allclose(vals, KNOWN[:3], rtol=10 * tol)
    exact = torch.linalg.eigh(A.double())[1].flip(1)[:, :3].T
    for v, e in zip(vecs.double(), exact):
        assert abs(abs(float(v @ e)) - 1) < 10 * tol
        assert v[v.abs().argmax()] > 0  # the sign convention
    # Hutchinson: unbiased, within 4 standard errors; exact (stderr 0) on a diagonal, since z_i² = 1.
    mean, stderr = C.trace(A, samples=200, seed=1)
    assert abs(mean - sum(KNOWN)) <= 4 * stderr
    assert C.trace(torch.diag(torch.tensor(KNOWN, dtype=dtype)), samples=3) == (pytest.approx(sum(KNOWN)), 0.0)
    # SLQ with as many steps as the dimension: the Ritz values are the eigenvalues, each run's
    # weights are the squared components of its start vector in the eigenbasis.
    spec = C.spectrum(A, runs=2, steps=len(KNOWN), bins=50, seed=0)
    for nodes, weights in zip(spec.nodes, spec.weights):
        np.testing.assert_allclose(np.sort(nodes), sorted(KNOWN), atol=1e-4 if dtype == torch.float32 else 1e-9)
        assert abs(weights.sum() - 1) < 1e-6
    assert spec.dim == len(KNOWN) and spec.ritz_mean == pytest.approx(sum(KNOWN) / len(KNOWN), abs=0.5)


def test_any_object_with_the_interface_is_an_operator_and_a_model_is_not(tiny):
    model, batches, _, _ = tiny
    A = symmetric_matrix(KNOWN, seed=2)

    class Mine:  # the bare interface: @, shape, dtype, device
        shape, dtype, device = A.shape, A.dtype, A.device

        def __matmul__(self, v):
            return A @ v

    assert np.allclose(C.top_eigenpairs(Mine(), k=2, tol=1e-8)[0], C.top_eigenpairs(A, k=2, tol=1e-8)[0])
    with pytest.raises(UsageError, match="not a linear operator") as err:
        C.trace(model, samples=2)
    assert "\n" not in str(err.value) and "HessianOperator" in str(err.value)
    with pytest.raises(UsageError, match="square"):
        C.spectrum(torch.zeros(3, 4))
    with pytest.raises(UsageError, match="identity"):
        C.trace(Mine(), samples=2, checkpoint="never-written.ckpt")


def test_submatrix_operator_is_the_principal_submatrix(tiny):
    model, batches, H, offsets = tiny
    A = symmetric_matrix(KNOWN, seed=3)
    index = torch.tensor([0, 2, 3, 7, 11])
    sub = C.SubmatrixOperator(A, index)
    np.testing.assert_allclose(C.top_eigenpairs(sub, k=2, tol=1e-10)[0],
                               torch.linalg.eigvalsh(A[index][:, index]).flip(0)[:2].numpy(), rtol=1e-8)
    assert C.trace(sub, samples=4)[0] != pytest.approx(float(A[index][:, index].trace()))  # a real estimate
    # The Hessian of a mask is the submatrix of the whole Hessian on the mask's coordinates.
    mask = _tiny_mask(model)
    keep = torch.cat([mask[n].reshape(-1) for n in offsets])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = C.HessianOperator(model, batches, kind="causal")
        masked = C.HessianOperator(model, batches, mask, "causal")
        v = torch.randn(masked.dim, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(C.SubmatrixOperator(whole, keep) @ v, masked @ v, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="distinct index"):
        C.SubmatrixOperator(A, torch.tensor([1, 1]))


def test_the_diagonal_fisher_is_an_operator_on_the_hessians_coordinates(tiny, tmp_path):
    model, batches, _, offsets = tiny
    gen = torch.Generator().manual_seed(8)
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    mask = _tiny_mask(model)
    F = C.fisher_operator(fisher, model, mask)
    kept = torch.cat([fisher[n][mask[n]].reshape(-1) for n in offsets])
    assert F.shape == (C.HessianOperator(model, batches, mask, "causal").dim,) * 2 == (kept.numel(),) * 2
    assert C.trace(F, samples=2) == (pytest.approx(float(kept.double().sum()), rel=1e-6), 0.0)
    assert C.top_eigenpairs(F, k=1, tol=1e-6)[0][0] == pytest.approx(float(kept.max()), rel=1e-5)
    with pytest.raises(UsageError, match="Fisher"):
        C.fisher_operator({k: v for k, v in fisher.items() if "wpe" not in k}, model)
    from landscape.fisher import save_fisher

    path = save_fisher(tmp_path / "F.safetensors", fisher, {"model": "tiny"})
    assert torch.equal(C.fisher_operator(path, model, mask).diagonal, F.diagonal)  # from the file alike


def test_one_report_builds_one_operator_and_its_graphs_once(tiny, monkeypatch, tmp_path):
    """top, trace and spectrum of one report share one operator: the first-order graphs of the
    sample are built once (the cache holds them), and the numbers are each estimator's own."""
    from landscape.curvature import operator

    model, batches, _, _ = tiny
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")  # no fallback: a failed first product would rebuild them
    built, real = [], operator.HessianOperator._gradient
    monkeypatch.setattr(operator.HessianOperator, "_gradient", lambda self, b: built.append(id(self)) or real(self, b))
    report = C.hessian_report(model, batches, kind="causal", top=1, trace_samples=5, spectrum_runs=2, steps=4,
                              bins=10, seed=3, max_iter=60)
    assert len(built) == len(batches) and len(set(built)) == 1
    op = C.HessianOperator(model, batches, kind="causal")
    assert report["trace"]["mean"] == C.trace(op, samples=5, seed=3)[0]
    assert report["eigenvalues"] == [float(v) for v in C.top_eigenpairs(op, k=1, seed=3, max_iter=60)[0]]
    assert report["spectrum"]["nodes"] == [n.tolist() for n in C.spectrum(op, runs=2, steps=4, bins=10, seed=3).nodes]


def test_a_subset_needing_fisher_scores_is_refused_in_one_place():
    from pathlib import Path

    from landscape.fisher.subsets import check_subset

    with pytest.raises(UsageError, match="needs Fisher scores"):
        check_subset("top:5", None)
    with pytest.raises(UsageError, match="takes no Fisher"):
        check_subset("adapter", {"w": torch.ones(1)})
    check_subset("all", None)
    package = Path(C.__file__).resolve().parents[1]
    saying = [p.relative_to(package).as_posix() for p in package.rglob("*.py")
              if "needs Fisher scores" in p.read_text()]
    assert saying == ["fisher/subsets.py"], saying


def test_a_report_with_its_bases_in_files_gives_the_dense_hessians_numbers(tiny, tmp_path, monkeypatch):
    """Bases over the budget (0 bytes here) go to files: the same eigenpairs, measured residuals and spectrum."""
    from landscape.curvature import krylov

    model, batches, H, offsets = tiny
    monkeypatch.setattr(krylov, "BLOCK_BYTES", 4096)  # several blocks of the 1144 coordinates
    settings = dict(top=2, spectrum_runs=2, steps=12, bins=40, seed=0, kind="causal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = C.hessian_report(model, batches, **settings)
        files = C.hessian_report(model, batches, basis_bytes=0, vectors=tmp_path / "v.h5", **settings)
    np.testing.assert_allclose(files["eigenvalues"], memory["eigenvalues"], rtol=1e-5)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    np.testing.assert_allclose(files["eigenvalues"], exact, rtol=1e-3)
    vectors, _ = load_directions(tmp_path / "v.h5")
    for value, vector, got in zip(files["eigenvalues"], vectors, files["eigenpairs"]["residuals"]):
        v = _flat(vector, offsets)
        dense = float(torch.linalg.norm(H @ v - value * v)) / abs(value)
        assert dense / 3 <= got <= 3 * dense, (got, dense)
    for a, b in zip(files["spectrum"]["nodes"], memory["spectrum"]["nodes"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_products_leave_the_parameters_gradients_as_they_were(tiny):
    """The products are summed through the parameters' .grad: what a caller had there comes back."""
    model, batches, H, offsets = tiny
    model = copy.deepcopy(model)
    mask = _tiny_mask(model)
    before = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    HP, keep = _dense_projected(H, mask, offsets)
    v = torch.randn(int(keep.sum()), generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hv = C.HessianOperator(model, batches, mask=mask, kind="causal", cache_bytes=0).matvec(v).double()
    want = HP @ v.double()
    assert torch.linalg.norm(hv - want) <= 1e-5 * torch.linalg.norm(want)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_the_cache_keeps_the_gradients_graph_not_their_values(tiny):
    """A product starts its backward at the cached gradients with v as cotangents: their values
    (4 bytes per parameter, and a view's base) are not kept, and the products stay exact."""
    model, batches, H, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = C.HessianOperator(model, batches, kind="causal")
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(7))
        first, second = op.matvec(v), op.matvec(v)
    held = [t for g in op._grad_sum if g is not None for t in (g, g._base) if t is not None]
    assert len(held) > len(op.names) // 2  # the cache is there (all batches fit it)
    assert all(t.untyped_storage().nbytes() <= t.element_size() for t in held)
    want = H @ v.double()
    assert torch.linalg.norm(second.double() - want) <= 1e-5 * torch.linalg.norm(want)
    assert torch.equal(first, second)
