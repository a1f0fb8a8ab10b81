"""The gradient-only Hessian-vector product (``HessianOperator(hvp="difference")``, docs/curvature.md).

Its relative error against the exact product on every tiny test model of conftest in float32, the
parameters bit-identical after a product, and ``hessian --hvp difference`` end to end on the tiny
GPT-2 (top eigenvalue, and a report of one method refused as the other's).  Run with ``-s`` to see
the measured errors.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import cli_in_process, one_line

from landscape import curvature
from landscape.curvature import difference
from landscape.data.corpus import load_batches
from landscape.errors import UsageError
from landscape.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAMPLE = ("--max-samples", 4, "--seq-len", 16, "--batch-size", 4)


def _smooth_t5(t5_dir):
    """The tiny T5 with gated-GELU feed-forward blocks (T5 v1.1, Flan-T5): conftest's uses ReLU (see below)."""
    from transformers import T5Config, T5ForConditionalGeneration

    loaded = load_model(str(t5_dir))
    # All three, as T5Config.__init__ derives them from feed_forward_proj ("gated-gelu").
    config = T5Config.from_pretrained(str(t5_dir), feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                                      is_gated_act=True)
    torch.manual_seed(0)
    loaded.model = T5ForConditionalGeneration(config).eval()
    return loaded


@pytest.fixture(params=["bert", "gpt2", "llama", "t5"])
def tiny_loaded(request):
    name = request.param
    directory = request.getfixturevalue(f"tiny_{name}_dir")
    return name, _smooth_t5(directory) if name == "t5" else load_model(str(directory))


def _operators(loaded, **options):
    batches = load_batches(loaded, corpus=None, max_samples=8, seq_len=32, batch_size=4, seed=0)
    exact = curvature.HessianOperator(loaded.model, batches, kind=loaded.kind)
    difference = curvature.HessianOperator(loaded.model, batches, kind=loaded.kind, hvp="difference", **options)
    return exact, difference


def test_difference_product_matches_the_exact_one_on_every_test_model(tiny_loaded):
    name, loaded = tiny_loaded
    assert loaded.model.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exact product's attention fallback
        exact, difference = _operators(loaded)
        generator = torch.Generator().manual_seed(0)
        # The loss's gradient (critical sharpness's direction), where the third derivative is large:
        # a two-gradient difference is 2e-3 to 9e-3 off there at the step random v want.
        vs = [_gradient(exact)] + [torch.randn(exact.dim, generator=generator) for _ in range(3)]
        errors = [float((difference @ v - exact @ v).norm() / (exact @ v).norm()) for v in vs]
    print(f"\n{name}: {exact.dim} coordinates, relative errors of the difference product along the gradient "
          f"{errors[0]:.1e}, along random v " + ", ".join(f"{e:.1e}" for e in errors[1:]))
    assert max(errors) <= 1e-3, errors
    assert difference.products == 4


def _gradient(op):
    """The flat gradient of the token-weighted mean loss over the operator's batches."""
    from landscape.data.objectives import sequence_losses

    total, tokens = 0.0, 0.0
    with op:  # eval mode, as the products see the model
        for batch in op.batches:
            losses = sequence_losses(op.model, batch, op.kind)
            total = total + losses.loss_sum.sum()
            tokens += float(losses.n_tokens.sum())
        return op.space.flatten(torch.autograd.grad(total / tokens, op.space.params)).detach()


def test_parameters_are_bit_identical_after_a_product(tiny_gpt2):
    model = tiny_gpt2.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = load_batches(tiny_gpt2, corpus=None, max_samples=4, seq_len=16, batch_size=2, seed=0)
    # A mask too: the perturbation of a masked tensor touches the kept elements only.
    mask = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5
            for name, p in model.named_parameters()}
    for keep in (None, mask):
        op = curvature.HessianOperator(model, batches, keep, tiny_gpt2.kind, hvp="difference")
        out = op @ torch.randn(op.dim, generator=torch.Generator().manual_seed(2))
        assert torch.isfinite(out).all() and float(out.norm()) > 0
    for name, p in model.named_parameters():
        assert p.dtype == before[name].dtype and torch.equal(p.detach(), before[name]), name
        assert p.grad is None, name


def test_a_relu_model_is_warned_about(tiny_t5):
    # The ReLU T5 of conftest: the difference counts the gradient's jumps at the kinks, which the
    # exact product (ReLU'' = 0) leaves out; measured 0.63-9.8 relative error at every step size.
    batches = load_batches(tiny_t5, corpus=None, max_samples=4, seq_len=16, batch_size=4, seed=0)
    op = curvature.HessianOperator(tiny_t5.model, batches, kind=tiny_t5.kind, hvp="difference")
    with pytest.warns(UserWarning, match="ReLU activations"):
        op @ torch.ones(op.dim)


def test_identity_names_the_method_only_when_not_exact(tiny_gpt2):
    batches = load_batches(tiny_gpt2, corpus=None, max_samples=4, seq_len=16, batch_size=4, seed=0)
    exact = curvature.HessianOperator(tiny_gpt2.model, batches, kind=tiny_gpt2.kind)
    difference = curvature.HessianOperator(tiny_gpt2.model, batches, kind=tiny_gpt2.kind, hvp="difference")
    assert "hvp" not in exact.identity()  # checkpoints written before the option keep resuming
    assert difference.identity() == dict(exact.identity(), hvp="difference")
    with pytest.raises(UsageError, match="exact, difference"):
        curvature.HessianOperator(tiny_gpt2.model, batches, kind=tiny_gpt2.kind, hvp="forward")


def test_hessian_cli_with_difference_products(capfd, tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    def run(out, *extra):
        return cli_in_process(capfd, "hessian", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE,
                              "--top", 1, "--out", out, "--quiet", *extra)

    exact, difference = tmp_path / "exact.json", tmp_path / "difference.json"
    assert run(exact)[0] == 0
    assert run(difference, "--hvp", "difference")[0] == 0
    want = json.loads(exact.read_text())
    got = json.loads(difference.read_text())
    with capfd.disabled():
        print(f"\ntop eigenvalue: exact {want['eigenvalues'][0]:.8g}, difference {got['eigenvalues'][0]:.8g}")
    assert abs(got["eigenvalues"][0] - want["eigenvalues"][0]) <= 1e-3 * abs(want["eigenvalues"][0])
    assert "hvp" not in want["settings"] and got["settings"]["hvp"] == "difference"
    # SDPA on CPU has no second derivative: the exact run falls back to eager, the difference needs not.
    assert want["provenance"]["attention_fallback"] and got["provenance"]["attention_fallback"] == ""
    # Resuming one method's report with the other is refused in one line, either way round.
    one_line(*run(difference)[::2], "hvp")
    one_line(*run(exact, "--hvp", "difference")[::2], "hvp")
    assert run(difference, "--hvp", "difference")[0] == 0  # the same settings: read back


def test_directions_and_rayleigh_pass_the_method_through(capfd, tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    import h5py

    common = ("--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, *SAMPLE, "--quiet")
    values = {}
    for method in ("exact", "difference"):
        out = tmp_path / f"{method}.h5"
        assert cli_in_process(capfd, "directions", "--kind", "hessian", "--dims", 1, "--hvp", method, *common,
                              "--out", out)[0] == 0
        with h5py.File(out, "r") as f:
            values[method] = float(f.attrs["eigenvalues"][0])
            assert f.attrs.get("hvp") == (None if method == "exact" else "difference")
    assert abs(values["difference"] - values["exact"]) <= 1e-3 * abs(values["exact"]), values
    one_line(*cli_in_process(capfd, "directions", "--kind", "hessian", "--dims", 1, *common, "--out",
                             tmp_path / "difference.h5")[::2], "hvp")

    quotients = {}
    for method in ("exact", "difference"):
        out = tmp_path / f"{method}.json"
        assert cli_in_process(capfd, "critical-sharpness", "--rayleigh", "--hvp", method, *common, "--out",
                              out)[0] == 0
        report = json.loads(out.read_text())
        quotients[method] = report["rayleigh_quotient"]
        assert report["settings"].get("hvp") == (None if method == "exact" else "difference")
    with capfd.disabled():
        print(f"\ntop-1 direction eigenvalue {values}, Rayleigh quotient along -g {quotients}")
    assert abs(quotients["difference"] - quotients["exact"]) <= 1e-3 * abs(quotients["exact"]), quotients
    one_line(*cli_in_process(capfd, "critical-sharpness", "--rayleigh", *common, "--out",
                             tmp_path / "difference.json")[::2], "hvp")
    one_line(*cli_in_process(capfd, "critical-sharpness", "--hvp", "difference", *common, "--out",
                             tmp_path / "no.json")[::2], "--hvp applies to --rayleigh only")


def _scaled_difference_operator(tiny_gpt2, monkeypatch, scale: float):
    """The tiny GPT-2's gradient-only operator on 4 × 16 tokens, its step ``scale`` times the rule's."""
    monkeypatch.setattr(difference, "DIFFERENCE_STEP", difference.DIFFERENCE_STEP * scale)
    batches = load_batches(tiny_gpt2, corpus=None, max_samples=4, seq_len=16, batch_size=4, seed=0)
    return curvature.HessianOperator(tiny_gpt2.model, batches, kind=tiny_gpt2.kind, hvp="difference")


@pytest.mark.parametrize("scale, refused", [(1, False), (30, True)])
def test_lanczos_refuses_difference_products_too_far_off_to_be_symmetric(tiny_gpt2, monkeypatch, scale, refused):
    """On SmolLM2 the old step rule was too large for the Lanczos vectors (docs/curvature.md, "Concentrated
    vectors"): its products along them were not a symmetric matrix's and Lanczos's eigenvalues of no
    matrix.  The tiny GPT-2 shows it at 30 times its default step (0.0091 of the largest coefficient
    at step 1; 0.001 at 15 times), and runs at the default."""
    op = _scaled_difference_operator(tiny_gpt2, monkeypatch, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged in 6 products
        if refused:
            with pytest.raises(UsageError, match="not symmetric along the Lanczos vectors"):
                curvature.top_eigenpairs(op, k=1, max_iter=6)
        else:
            assert np.isfinite(curvature.top_eigenpairs(op, k=1, max_iter=6)[0]).all()


@pytest.mark.parametrize("scale, refused", [(1, False), (20, True)])
def test_top_eigenpairs_refuse_an_eigenvalue_that_moves_with_the_step(tiny_gpt2, monkeypatch, scale, refused):
    """The symmetry check sees asymmetric errors only (docs/curvature.md, "Concentrated vectors"); with it
    off, a step 20 times the rule's is refused on the tiny GPT-2 because the Rayleigh quotient along the
    returned vector moves when the step is halved (20.874 at the step, 21.117 at half of it: 0.012
    apart, the exact eigenvalue 21.170), and the rule's own step passes (21.169635)."""
    from landscape.curvature import lanczos

    monkeypatch.setattr(lanczos, "ASYMMETRY_LIMIT", float("inf"))
    op = _scaled_difference_operator(tiny_gpt2, monkeypatch, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged in 6 products
        if refused:
            with pytest.raises(UsageError, match="not accurate along eigenvector 1: its Rayleigh quotient"):
                curvature.top_eigenpairs(op, k=1, max_iter=6, tol=1e-3)
        else:
            values, _, info = curvature.top_eigenpairs(op, k=1, max_iter=6, tol=1e-3, return_info=True)
            assert np.isfinite(values).all()
            assert info.products == op.products == 6 + 2  # one residual and one check product
    assert op.step_scale == 1.0  # the check's half step is not left behind


def test_the_step_bounds_the_largest_coordinate_move(tiny_gpt2):
    """ε·‖v‖_∞ = c·(1 + ‖θ‖)/√n whether v is spread or on one coordinate (docs/curvature.md, "Concentrated
    vectors"): the earlier rule ε·‖v‖ = c·(1 + ‖θ‖) moved a one-coordinate v's element √n/15 times as far."""
    params = [p for p in tiny_gpt2.model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    theta = sum(float(p.detach().double().square().sum()) for p in params) ** 0.5
    spread = torch.randn(n, generator=torch.Generator().manual_seed(0))
    single = torch.zeros(n)
    single[123] = -3.0
    eps32 = torch.finfo(torch.float32).eps
    for v in (spread, single, spread * 1e-3):
        move = difference.step(params, v, eps32) * float(v.abs().max())
        assert move == pytest.approx(difference.DIFFERENCE_STEP * (1 + theta) / n**0.5, rel=1e-9)
    # A float64 model: the 4th-order stencil's optimum, (eps64/eps32)^(1/5) of it.
    ratio = difference.step(params, single, torch.finfo(torch.float64).eps) / difference.step(params, single, eps32)
    assert ratio == pytest.approx((torch.finfo(torch.float64).eps / eps32) ** 0.2, rel=1e-12)
    assert difference.step(params, torch.zeros(n), eps32) == 0.0
