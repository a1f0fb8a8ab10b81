"""Each weight's shares of a product's second backward are taken as they are made (``curvature/routes.py``).

The routed products equal those autograd sums itself (the same operator with no routes) and the
dense Hessian on the tiny BERT, GPT-2, Llama (untied and tied output weights) and T5 in float64,
with and without a mask and the graph cache, for H·v and vᵀHv; every coordinate's parameter is
routed; and during a product's second backward no share of the output layer waits for another
(autograd's buffer held two of them and their sum: the memory docs/curvature.md "Memory" counts).
"""

import copy
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from landscape import curvature as C
from landscape.curvature.routes import Routes
from landscape.data.corpus import load_batches
from landscape.data.objectives import sequence_losses
from landscape.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _tied_llama(loaded):
    """The tiny Llama with its output layer tied to the embedding (a new model of the same config)."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(loaded.model.config)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(params=["bert", "gpt2", "llama", "llama-tied", "t5"])
def tiny_case(request):
    """(float64 model, batches, kind) of each tiny model."""
    name = request.param.split("-")[0]
    loaded = load_model(str(request.getfixturevalue(f"tiny_{name}_dir")))
    batches = load_batches(loaded, corpus=None, max_samples=4, seq_len=12, batch_size=2, seed=0)
    model = _tied_llama(loaded) if request.param == "llama-tied" else loaded.model
    model = model.double().eval()
    model.set_attn_implementation("eager")  # SDPA on CPU has no double backward
    return model, batches, loaded.kind


def _mask(model, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < keep for n, p in model.named_parameters()}


def _unrouted(monkeypatch):
    """Products as autograd sums them itself: no node hooked."""
    monkeypatch.setattr(Routes, "attach", lambda self, take: [])


def _run(model, batches, kind, v, **options):
    op = C.HessianOperator(model, batches, kind=kind, **options)
    with op, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op.matvec(v)  # the first product records the cache; the second reuses it
        return op.matvec(v), op.quadratic(v)


@pytest.mark.parametrize("cache_bytes,masked", [(2**30, False), (0, False), (2**30, True)])
def test_routed_products_equal_autograds_own_sums(tiny_case, cache_bytes, masked, monkeypatch):
    model, batches, kind = tiny_case
    mask = _mask(model, 0.5, 1) if masked else None
    dim = C.HessianOperator(model, batches, mask, kind).dim
    v = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    product, form = _run(model, batches, kind, v, mask=mask, cache_bytes=cache_bytes)
    _unrouted(monkeypatch)
    want_product, want_form = _run(model, batches, kind, v, mask=mask, cache_bytes=cache_bytes)
    # The same float64 sums in another grouping (a tied weight's shares one by one), then float32.
    torch.testing.assert_close(product, want_product, rtol=1e-6, atol=1e-6 * float(want_product.abs().max()))
    assert form == pytest.approx(want_form, rel=1e-10)


def test_every_coordinates_parameter_is_routed(tiny_case):
    model, batches, kind = tiny_case
    op = C.HessianOperator(model, batches, kind=kind)
    with op, torch.enable_grad():
        grads, _, _ = op._gradient(batches[0])
        routes = Routes(grads, op.space.params)
    reached = {block for targets in routes.routes.values() for _, block, _ in targets}
    assert reached == set(range(len(op.space.params)))


def _dense_on_mask(model, batches, kind, mask):
    """The Hessian of the token-mean loss restricted to the mask's coordinates: one double backward per row."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [model.get_parameter(n) for n in names]
    total, tokens = 0.0, 0.0
    for batch in batches:
        losses = sequence_losses(model, batch, kind)
        total, tokens = total + losses.loss_sum.sum(), tokens + float(losses.n_tokens.sum())
    grads = torch.autograd.grad(total / tokens, params, create_graph=True)
    kept = [mask[n].reshape(-1).nonzero()[:, 0] for n in names]
    rows = []
    for g, index in zip(grads, kept):
        for i in index.tolist():
            second = torch.autograd.grad(g.reshape(-1)[i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([torch.zeros(len(k), dtype=torch.float64) if s is None else s.reshape(-1)[k]
                                   for s, k in zip(second, kept)]))
    dense = torch.stack(rows).detach()
    return (dense + dense.T) / 2


def test_routed_products_equal_the_dense_hessian_on_a_mask(tiny_case):
    model, batches, kind = tiny_case
    keep = 120 / sum(p.numel() for p in model.parameters())  # about 120 coordinates, over every tensor
    mask = _mask(model, keep, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H = _dense_on_mask(model, batches, kind, mask)
    gen = torch.Generator().manual_seed(4)
    for cache_bytes in (2**30, 0):
        op = C.HessianOperator(model, batches, mask, kind, cache_bytes=cache_bytes)
        assert op.dim == H.shape[0]
        v = torch.randn(op.dim, generator=gen).double()  # the operator takes float32 vectors
        with op:
            product, form = op.matvec(v), op.quadratic(v)
        want = H @ v
        assert torch.linalg.norm(product.double() - want) <= 1e-5 * torch.linalg.norm(want)
        # BERT's float64 forward keeps some float32 steps: the forms agree to 7e-8 there (routed or not).
        assert form == pytest.approx(float(v @ want), rel=1e-6, abs=1e-6 * float(v.norm() * want.norm()))


class _FreshTensors(TorchDispatchMode):
    """The most tensors of ``numel`` elements with their own storage alive at once (views and parts not counted)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.alive, self.peak = numel, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                own = isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                if own and t.numel() == self.numel:  # not a part of a larger tensor (the product's vector)
                    key = t.untyped_storage().data_ptr()
                    if key not in self.alive:
                        self.alive.add(key)
                        weakref.finalize(t.untyped_storage(), self.alive.discard, key)
                        self.peak = max(self.peak, len(self.alive))
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_no_share_of_the_output_layer_waits_for_another(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Sizes chosen so that nothing else (logits, MLP matrices) has the output layer's 301 x 24 elements.
    config = LlamaConfig(vocab_size=301, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tied, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    op = C.HessianOperator(model, batches, kind="causal")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2))
    with op:
        op.matvec(v)  # records the cached graph
        with _FreshTensors(model.lm_head.weight.numel()) as fresh:
            op.matvec(v)
    # One share at a time (autograd's buffer held the forward's share, the first backward's and their sum).
    assert fresh.peak == 1


def test_an_estimators_products_leave_the_float32_copies_released(tiny_llama_dir, monkeypatch):
    loaded = load_model(str(tiny_llama_dir))
    batches = load_batches(loaded, corpus=None, max_samples=4, seq_len=12, batch_size=2, seed=0)
    half = copy.deepcopy(loaded.model).to(torch.bfloat16)
    # Eager: SDPA's fallback would record the first graph twice (tested in test_curvature.py).
    half.set_attn_implementation("eager")
    full = copy.deepcopy(half).float()  # the same weights in float32: the products to equal
    op = C.HessianOperator(half, batches, kind=loaded.kind)
    held = []  # bytes the largest weight's storage held as each product began
    weight = max(half.parameters(), key=lambda p: p.numel())
    products = C.HessianOperator._products

    def observed(self, v, quadratic):
        held.append(weight.untyped_storage().nbytes())
        return products(self, v, quadratic)

    monkeypatch.setattr(C.HessianOperator, "_products", observed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with op:
            fingerprint = op.identity()[C.operator.MODEL_KEY]
            values = C.top_eigenpairs(op, k=2, max_iter=8, seed=0)[0]
            # The estimator's block ended inside this one: the model holds its float32 weights again.
            assert all(p.dtype == torch.float32 and p.untyped_storage().nbytes() == 4 * p.numel()
                       for p in half.parameters())
            assert op.identity()[C.operator.MODEL_KEY] == fingerprint
        monkeypatch.undo()
        want = C.top_eigenpairs(C.HessianOperator(full, batches, kind=loaded.kind), k=2, max_iter=8, seed=0)[0]
    # The first product records the graph from the float32 copies; the others find them released.
    assert held[0] == 4 * weight.numel() and held[1:] and all(n <= 4 for n in held[1:])
    assert (values == want).all()


def test_a_padding_token_among_the_inputs_leaves_the_products_the_loss_s_hessian(tiny_llama_dir):
    """An embedding's ``padding_idx`` leaves its row out of the gradient where the pad token is an input.

    The tiny Llama's pad token is its EOS (as SmolLM2's is); a text holding it made the exact
    product the Jacobian of that partial gradient: no symmetric matrix, and far from the loss's
    Hessian.  The operator clears ``padding_idx`` for its products (and puts it back).
    """
    loaded = load_model(str(tiny_llama_dir))
    model = loaded.model.double().eval()
    model.set_attn_implementation("eager")
    pad = model.config.pad_token_id
    batches = load_batches(loaded, corpus=None, max_samples=2, seq_len=12, batch_size=2, seed=0)
    batches[0]["input_ids"][:, 3] = pad
    batches[0]["labels"][:, 3] = pad
    op = C.HessianOperator(model, batches, kind=loaded.kind)
    gen = torch.Generator().manual_seed(0)
    u, v = (w / w.norm() for w in (torch.randn(op.dim, generator=gen, dtype=torch.float64) for _ in range(2)))
    with op:
        hv, hu = op.matvec(v).double(), op.matvec(u).double()
    assert model.model.embed_tokens.padding_idx == pad  # put back

    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(shift):
        originals = [p.data for p in params]
        offset = 0
        for p in params:
            p.data = p.data + shift * v[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        try:
            losses = [sequence_losses(model, b, loaded.kind) for b in batches]
            mean = sum(x.loss_sum.sum() for x in losses) / sum(x.n_tokens.sum() for x in losses)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean, params)])
        finally:
            for p, data in zip(params, originals):
                p.data = data

    model.model.embed_tokens.padding_idx = None  # the loss's own gradient
    # The loss is summed in float32 (objectives.sequence_losses), so the difference is rounded by
    # ~1e-7/eps: 1.0e-4 of the largest element at this eps (0.8 before padding_idx was cleared).
    eps = 1e-3
    difference = (gradient(eps) - gradient(-eps)) / (2 * eps)
    assert float((hv - difference).abs().max()) < 1e-3 * float(difference.abs().max())
    assert float(u @ hv) == pytest.approx(float(v @ hu), rel=1e-6)  # float32 loss: 8e-8 measured


def test_the_trace_draws_its_first_probe_after_the_graph_with_the_copies_released(tiny_llama_dir, monkeypatch):
    from landscape.curvature import estimators

    loaded = load_model(str(tiny_llama_dir))
    batches = load_batches(loaded, corpus=None, max_samples=4, seq_len=12, batch_size=2, seed=0)
    half = copy.deepcopy(loaded.model).to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    op = C.HessianOperator(half, batches, kind=loaded.kind)
    weight = max(half.parameters(), key=lambda p: p.numel())
    seen = []  # (graph recorded, bytes the largest weight's storage held) as each probe was drawn
    draw = estimators._rademacher

    def observed(*args, **kwargs):
        seen.append((op._grad_sum is not None, weight.untyped_storage().nbytes()))
        return draw(*args, **kwargs)

    monkeypatch.setattr(estimators, "_rademacher", observed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = C.trace(op, samples=3, seed=1)
        monkeypatch.undo()
        want = C.trace(C.HessianOperator(full, batches, kind=loaded.kind), samples=3, seed=1)
    assert seen == [(True, 4)] * 3
    assert got == want


@pytest.mark.parametrize("cache_bytes,masked", [(2**30, False), (0, False), (2**30, True)])
def test_a_basis_row_read_by_parts_gives_the_same_products(tiny_case, cache_bytes, masked, monkeypatch):
    """A Krylov row in a file is read a parameter's part at a time by the second backward (``cotangents``)."""
    from landscape.curvature.krylov import FileBasis

    model, batches, kind = tiny_case
    mask = _mask(model, 120 / sum(p.numel() for p in model.parameters()), 3) if masked else None
    op = C.HessianOperator(model, batches, mask, kind, cache_bytes=cache_bytes)
    # Column blocks of 97 coordinates: parameters' parts straddle them.
    basis = FileBasis(3, op.dim, torch.float32, "cpu", block_bytes=3 * 4 * 97)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5))
    basis.put(1, v)
    reads = []
    read = type(basis.row(1)).read
    monkeypatch.setattr(type(basis.row(1)), "read", lambda self, start, count: reads.append(count) or read(
        self, start, count))
    monkeypatch.setattr(FileBasis, "get", None)  # the row is never read whole
    with op, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = op.matvec(v)
        got = [op.matvec(basis.row(1)) for _ in range(2)]  # the cache's first product, then its reuse
    assert all(torch.equal(g, want) for g in got)
    assert reads and max(reads) == max(b.count for b in op.space.blocks) < op.dim
    if masked:
        H = _dense_on_mask(model, batches, kind, mask)
        want = H @ v.double()
        assert torch.linalg.norm(got[0].double() - want) <= 1e-5 * torch.linalg.norm(want)


def test_lanczos_with_its_basis_in_a_file_hands_the_product_its_rows_unread(tiny_llama_dir, monkeypatch):
    from landscape.curvature.krylov import FileRow

    loaded = load_model(str(tiny_llama_dir))
    batches = load_batches(loaded, corpus=None, max_samples=4, seq_len=12, batch_size=2, seed=0)
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)  # the released float32 copies too
    model.set_attn_implementation("eager")
    op = C.HessianOperator(model, batches, kind=loaded.kind)
    given = []
    matvec = C.HessianOperator.matvec
    monkeypatch.setattr(C.HessianOperator, "matvec", lambda self, v: given.append(type(v)) or matvec(self, v))

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            top = C.top_eigenpairs(op, k=2, max_iter=12, seed=0, basis_bytes=0, return_info=True)
            density = C.spectrum(op, runs=2, steps=6, seed=1, basis_bytes=0)
        return top, density

    (values, vectors, info), density = run()
    # Lanczos's products get rows; the residuals' checks, the Ritz vectors.
    assert given == [FileRow] * (info.products - 2) + [torch.Tensor] * 2 + [FileRow] * 12
    monkeypatch.setattr(C.HessianOperator, "reads_rows", False)  # the rows read whole, as before
    (want_values, want_vectors, want_info), want_density = run()
    assert (values == want_values).all() and torch.equal(vectors, want_vectors)
    assert want_info.residuals == info.residuals
    pairs = zip(density.nodes + density.weights, want_density.nodes + want_density.weights)
    assert all((a == b).all() for a, b in pairs)


@pytest.mark.parametrize("basis_bytes", [0, 2**30])
def test_lanczos_holds_no_whole_vector_when_a_product_makes_its_own(tiny_llama_dir, basis_bytes, monkeypatch):
    """As each product allocates its vector, Lanczos holds no other vector of every coordinate.

    Before, a spectrum run held v (the last step's w, normalized) through the product, and the top
    eigenpairs read a file basis's row whole; the basis's own rows are not counted here (in memory
    they are parts of one tensor, in a file not in memory at all).
    """
    loaded = load_model(str(tiny_llama_dir))
    batches = load_batches(loaded, corpus=None, max_samples=4, seq_len=12, batch_size=2, seed=0)
    model = loaded.model
    model.set_attn_implementation("eager")
    op = C.HessianOperator(model, batches, kind=loaded.kind)
    alive = []
    prepare = C.operator._Accumulator.prepare

    def observed(self):
        alive.append(len(fresh.alive))
        return prepare(self)

    monkeypatch.setattr(C.operator._Accumulator, "prepare", observed)
    with _FreshTensors(op.dim) as fresh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        C.spectrum(op, runs=1, steps=5, seed=1, basis_bytes=basis_bytes)
        spectrum = alive[:]
        C.top_eigenpairs(op, k=1, max_iter=5, seed=0, basis_bytes=basis_bytes)
    top = alive[len(spectrum):-1]  # the last: the residual's check on the returned vector
    assert spectrum == [0] * 5 and top == [0] * 5
