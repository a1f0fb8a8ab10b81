"""The Hessian's memory savings keep its numbers (docs/curvature.md, "Memory").

A bfloat16 model's float32 weight copies are dropped while a product's second backward runs
(``curvature/upcast.py``): its products stay bit-identical to a float32 model holding the same
weights, on the tiny BERT, GPT-2, Llama and T5, with and without the graph cache and a mask; a model
loaded in bfloat16 has the products of the float32 load holding its weights (the Llama's rotary
frequencies stay float32); a copy changed in place inside the operator's block is used as changed.
``HessianOperator.quadratic`` (vᵀHv with no product vector, ``curvature/quadratic.py``: what
Hutchinson's probes use) equals the dot of the product on those models in float64, with a mask,
and the dense Hessian's zᵀHz.
"""

import copy
import warnings

import pytest
import torch

from landscape import curvature as C
from landscape.data.corpus import load_batches
from landscape.models import load_model
from landscape.testing.dense import dense_hessian

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(params=["bert", "gpt2", "llama", "t5"])
def tiny_loaded(request):
    loaded = load_model(str(request.getfixturevalue(f"tiny_{request.param}_dir")))
    batches = load_batches(loaded, corpus=None, max_samples=6, seq_len=16, batch_size=3, seed=0)
    return loaded, batches


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention fallback's warning
        return function(*args, **kwargs)


def _products(model, batches, kind, vs, **options):
    op = C.HessianOperator(model, batches, kind=kind, **options)
    with op:
        return [_quiet(op.matvec, v) for v in vs]


@pytest.mark.parametrize("cache_bytes,masked", [(2**30, False), (0, False), (2**30, True)])
def test_half_precision_products_equal_a_float32_models_bit_for_bit(tiny_loaded, cache_bytes, masked):
    loaded, batches = tiny_loaded
    half = copy.deepcopy(loaded.model).to(torch.bfloat16)
    full = copy.deepcopy(half).float()  # the same (bfloat16-rounded) weights, held in float32
    raw = {n: p.detach().clone() for n, p in half.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in full.named_parameters()} if masked else None
    dim = C.HessianOperator(full, batches, mask, loaded.kind).dim
    vs = [torch.randn(dim, generator=gen) for _ in range(3)]  # the first builds the cache, the others reuse it
    got = _products(half, batches, loaded.kind, vs, cache_bytes=cache_bytes, mask=mask)
    want = _products(full, batches, loaded.kind, vs, cache_bytes=cache_bytes, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, raw[n]) for n, p in half.named_parameters())


def test_a_bfloat16_load_has_the_products_of_the_float32_load_holding_its_weights(tiny_loaded):
    # What a user compares: `--dtype bfloat16` against `--dtype float32` on one checkpoint.  Only the
    # weights may differ: the Llama's rotary frequencies (computed from the config) were rounded to
    # bfloat16 by the load's cast, and its products moved (SmolLM2: 2.7e-3 relative).
    loaded, batches = tiny_loaded
    half = load_model(loaded.source, dtype="bfloat16").model
    full = load_model(loaded.source).model
    with torch.no_grad():
        for name, param in full.named_parameters():
            param.copy_(half.get_parameter(name))
    dim = C.HessianOperator(full, batches, kind=loaded.kind).dim
    vs = [torch.randn(dim, generator=torch.Generator().manual_seed(3))]
    got = _products(half, batches, loaded.kind, vs)
    want = _products(full, batches, loaded.kind, vs)
    assert torch.equal(got[0], want[0])


def test_half_precision_weights_hold_no_float32_copy_during_the_second_backward(tiny_loaded):
    loaded, batches = tiny_loaded
    half = copy.deepcopy(loaded.model).to(torch.bfloat16)
    op = C.HessianOperator(half, batches, kind=loaded.kind)
    held = {}  # what each parameter's storage held when its share of H·v arrived

    def seen(name):
        def hook(p):
            held.setdefault(name, p.untyped_storage().nbytes())
        return hook

    hooks = [p.register_post_accumulate_grad_hook(seen(n)) for n, p in half.named_parameters()]
    with op:
        _quiet(op.matvec, torch.ones(op.dim))
        # Outside a product the model holds its float32 weights again (a forward sees them).
        assert all(p.dtype == torch.float32 and p.untyped_storage().nbytes() == 4 * p.numel()
                   for p in half.parameters())
    for hook in hooks:
        hook.remove()
    large = [n for n, p in half.named_parameters() if p.numel() > 1]
    assert large and all(held[n] <= 4 for n in large)  # one float32 zero, expanded


def test_a_float32_copy_changed_inside_the_block_is_used_as_changed(tiny_loaded):
    loaded, batches = tiny_loaded
    half = copy.deepcopy(loaded.model).to(torch.bfloat16)
    name, _ = next((n, p) for n, p in half.named_parameters() if p.dim() == 2)
    op = C.HessianOperator(half, batches, kind=loaded.kind)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    with op:
        _quiet(op.matvec, v)  # the graph of the original weights, cached
        with torch.no_grad():
            half.get_parameter(name).mul_(1.5)  # the float32 copy, inside the block
        got = _quiet(op.matvec, v)
    full = copy.deepcopy(half).float()  # the block's end put the bfloat16 originals back
    with torch.no_grad():
        full.get_parameter(name).mul_(1.5)
    assert torch.equal(got, _products(full, batches, loaded.kind, [v])[0])


def test_quadratic_form_is_the_dot_of_the_product(tiny_loaded):
    loaded, batches = tiny_loaded
    model = copy.deepcopy(loaded.model).double()
    gen = torch.Generator().manual_seed(2)
    mask = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()}
    for options in ({}, {"mask": mask}, {"cache_bytes": 0}):
        op = C.HessianOperator(model, batches, kind=loaded.kind, **options)
        v = torch.randn(op.dim, generator=gen)
        with op:
            form = _quiet(op.quadratic, v)
            product = _quiet(op.matvec, v)
        want = float(v.double() @ product.double())
        # The product comes back in float32; the form sums the float64 shares.
        assert form == pytest.approx(want, rel=1e-5, abs=1e-6 * float(v.norm() * product.norm()))


def test_quadratic_form_equals_the_dense_hessians():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval().double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 16, (3, 10), generator=gen)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    H, _ = dense_hessian(model, batches)
    op = C.HessianOperator(model, batches, kind="causal")
    for i in range(3):
        z = torch.randint(0, 2, (op.dim,), generator=gen).double() * 2 - 1
        want = float(z @ H.double() @ z)
        assert _quiet(op.quadratic, z) == pytest.approx(want, rel=1e-9, abs=1e-9 * float(H.abs().sum()))
    # Hutchinson's probes are quadratic forms: one probe's estimate is its form.
    assert C.trace(op, samples=1, seed=5)[0] == _quiet(op.quadratic, _probe(op.dim, 5))


def _probe(dim, seed):
    from landscape.curvature.lanczos import _generator, _rademacher

    return _rademacher(dim, _generator(seed, 2, 0), "cpu")
