"""Every registered per-layer Fisher rule (``landscape/fisher/rules.py``) against a per-sample loop.

docs/fisher.md defines the diagonal empirical Fisher as F_j = (1/N) Σ_n (∂ℓ_n/∂θ_j)², with ℓ_n the
loss of sample n alone.  Each case puts one layer of a rule's type into a tiny classifier (the
layer, then fixed operations without parameters), so the layer's parameters are the only ones and
the rule alone forms their per-sample gradients.  The library's accumulator must then give what N
backward passes of batch size 1 give, with squares summed and divided by N as the docs say.

The test is parametrized over the registry itself: a rule registered without a case in ``CASES``
fails here, so a new layer rule cannot go untested.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn

from landscape.fisher import rules
from landscape.fisher.accumulator import FisherAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAMPLES, ROWS, WIDTH, CLASSES, VOCAB = 7, 5, 6, 3, 11
# Both ways the accumulator calls a rule: whole tensors, and (with a budget of a few elements) one
# sample at a time in blocks of rows, ``rows=(a, b)``.
BUDGETS = {"whole": None, "row-blocks": 1e-5}


class _Probe(nn.Module):
    """``layer``, then (optionally) ``decoder``, tanh, the mean over rows and a fixed projection.

    The loss of a sample is the cross-entropy of its label (the ``classification`` objective), so
    every row of a sample reaches it through a nonlinearity: the rule's sum over rows is checked.
    """

    def __init__(self, layer, width, decoder=None):
        super().__init__()
        self.layer, self.decoder = layer, decoder
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("head", torch.randn(width, CLASSES, generator=generator))

    def forward(self, inputs):
        hidden = self.layer(inputs)
        if self.decoder is not None:
            hidden = self.decoder(torch.tanh(hidden))
        return SimpleNamespace(logits=torch.tanh(hidden).mean(1) @ self.head)


def _randomized(module):
    """``module`` with every parameter drawn at random (norms start at ones and zeros otherwise)."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param))
    return module


def _features():
    return torch.randn(SAMPLES, ROWS, WIDTH)


def _tokens():
    ids = torch.randint(0, VOCAB, (SAMPLES, ROWS))
    ids[::3, -1] = 0  # the padding row: no gradient reaches it
    return ids


def _linear():
    return _Probe(_randomized(nn.Linear(WIDTH, 4)), 4), _features()


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    return _Probe(_randomized(Conv1D(4, WIDTH)), 4), _features()


def _embedding():
    return _Probe(_randomized(nn.Embedding(VOCAB, 4, padding_idx=0)), 4), _tokens()


def _tied_embedding():
    """An embedding whose table is also the output decoder's weight (BERT, GPT-2): the sum of both
    uses is squared, and the embedding's per-sample gradient comes from its rule (no sparse path)."""
    embedding = _randomized(nn.Embedding(VOCAB, 4, padding_idx=0))
    decoder = nn.Linear(4, VOCAB, bias=False)
    decoder.weight = embedding.weight
    return _Probe(embedding, VOCAB, decoder=decoder), _tokens()


def _layer_norm():
    return _Probe(_randomized(nn.LayerNorm(WIDTH, eps=1e-3)), WIDTH), _features()


def _llama_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _Probe(_randomized(LlamaRMSNorm(WIDTH, eps=1e-3)), WIDTH), _features()


def _t5_layer_norm():
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return _Probe(_randomized(T5LayerNorm(WIDTH, eps=1e-3)), WIDTH), _features()


def _torch_rms_norm():
    return _Probe(_randomized(nn.RMSNorm(WIDTH, eps=1e-3)), WIDTH), _features()


# Rule name -> builders of (probe model, inputs) whose ``layer`` is of that rule's type.
CASES = {
    "linear": [_linear],
    "conv1d": [_conv1d],
    "embedding": [_embedding, _tied_embedding],
    "layernorm": [_layer_norm],
    "rmsnorm": [_llama_rms_norm, _t5_layer_norm, _torch_rms_norm],
}
REGISTERED = [rule for _, rule in rules._REGISTRY]


def _per_sample_loop(model, inputs, labels):
    """F by the definition: one float64 backward per sample, squared gradients summed, divided by N."""
    model = copy.deepcopy(model).double()
    inputs = inputs if not inputs.is_floating_point() else inputs.double()
    params = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for n in range(len(labels)):
        loss = nnf.cross_entropy(model(inputs[n:n + 1]).logits, labels[n:n + 1])
        for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()))):
            sums[name] += grad.square()
    return {name: total / len(labels) for name, total in sums.items()}


def _library(model, inputs, labels, budget):
    """F from ``FisherAccumulator`` over two batches, checked to come from ``rule`` hooks only."""
    accumulator = FisherAccumulator(model, kind="classification", max_chunk_mb=budget)
    for part in (slice(0, 4), slice(4, None)):
        accumulator.add_batch({"inputs": inputs[part], "labels": labels[part]})
    return accumulator, accumulator.fisher()


def test_every_case_names_a_registered_rule():
    assert set(CASES) <= {rule.name for rule in REGISTERED}, "a case for a rule that is not registered"


@pytest.mark.parametrize("budget", list(BUDGETS.values()), ids=list(BUDGETS))
@pytest.mark.parametrize("rule", REGISTERED, ids=[rule.name for rule in REGISTERED])
def test_rule_equals_a_per_sample_loop(rule, budget):
    assert CASES.get(rule.name), f"Fisher rule '{rule.name}' is registered without a case in CASES"
    for build in CASES[rule.name]:
        torch.manual_seed(0)
        model, inputs = build()
        labels = torch.randint(0, CLASSES, (SAMPLES,))
        accumulator, fisher = _library(model, inputs, labels, budget)
        # The rule under test formed every per-sample gradient (the vmapped fallback would pass
        # too, and would leave the rule untested).
        assert accumulator.fallback == [], build.__name__
        assert rules.rule_for("layer", model.layer) is rule, build.__name__
        assert rule in {hooked_rule for _, hooked_rule, _ in accumulator.hooked.values()}, build.__name__
        expected = _per_sample_loop(model, inputs, labels)
        assert set(fisher) == set(expected), build.__name__
        for name, value in expected.items():
            assert value.abs().max() > 0, (build.__name__, name)
            torch.testing.assert_close(fisher[name].double(), value, rtol=1e-5, atol=1e-7 * float(value.abs().max()),
                                       msg=lambda m: f"{build.__name__}: {name}: {m}")


@pytest.mark.parametrize("build", [_linear, _tied_embedding, _llama_rms_norm], ids=lambda b: b.__name__[1:])
def test_one_sample_of_weight_one_adds_the_bits_a_weighted_product_adds(build):
    """Samples of weight 1, one at a time (row blocks), are added to a sum without the (1 x 1) weight
    product that every other case uses; a second, all-ones group still takes that product, and its
    sums must be the same floats."""
    torch.manual_seed(0)
    model, inputs = build()
    labels = torch.randint(0, CLASSES, (SAMPLES,))
    one = FisherAccumulator(model, kind="classification", max_chunk_mb=BUDGETS["row-blocks"])
    two = FisherAccumulator(model, n_groups=2, kind="classification", max_chunk_mb=BUDGETS["row-blocks"])
    for part in (slice(0, 4), slice(4, None)):
        batch = {"inputs": inputs[part], "labels": labels[part]}
        one.add_batch(batch)
        two.add_batch(batch, torch.ones(len(labels[part]), 2))
    for name, total in one.sums.items():
        assert total.abs().max() > 0, name
        assert torch.equal(total[0], two.sums[name][0]), name


def test_hook_planning_walks_the_modules_a_fixed_number_of_times_not_once_per_parameter():
    """Planning reads every module's parameters in one walk: a walk per parameter cost 0.14 s of every
    Fisher call on SmolLM2 (272 tensors, 400+ modules), a tenth of a small sample's pass."""
    walks = {}
    for depth in (2, 8):
        model = _Probe(nn.Sequential(*[_randomized(nn.Linear(WIDTH, WIDTH)) for _ in range(depth)]), WIDTH)
        walk, calls = model.named_modules, []  # parameters() and named_parameters() walk through it too
        model.named_modules = lambda *a, _walk=walk, _calls=calls, **k: _calls.append(1) or _walk(*a, **k)
        accumulator = FisherAccumulator(model, kind="classification")
        assert len(accumulator.params) == 2 * depth and accumulator.fallback == []
        walks[depth] = len(calls)
    assert walks[2] == walks[8], walks
