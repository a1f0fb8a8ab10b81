"""ChildTuning-D: the child is the top task-Fisher elements; only it (and the head) moves."""

import copy

import pytest
import torch

from landscape import regularizers
from landscape.errors import UsageError
from landscape.fisher import compute_fisher

HEAD = {"classifier.weight", "classifier.bias"}


def _classifier(tiny_bert_dir):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 100, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,), generator=g)})
    return out


def _grads(model, batch):
    model.zero_grad()
    model.eval()(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_top_fraction_mask_keeps_an_exact_count_breaking_ties_in_order():
    scores = {"a": torch.tensor([3.0, 1.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 0.0]])}
    masks = regularizers.top_fraction_mask(scores, 0.5)  # k = 3 of 6: the 3 and the first two 1s
    assert masks["a"].tolist() == [True, True, True, False]
    assert masks["b"].tolist() == [[False, False]]
    assert sum(int(m.sum()) for m in regularizers.top_fraction_mask(scores, 1.0).values()) == 6
    with pytest.raises(UsageError):
        regularizers.top_fraction_mask(scores, 0.0)


@pytest.mark.parametrize("reserve", [0.3, 0.05])
def test_mask_keeps_round_reserve_n_elements_with_the_highest_task_fisher(tiny_bert_dir, reserve):
    model = _classifier(tiny_bert_dir).train()
    mask = regularizers.childtuning_mask(model, _batches(), reserve=reserve)
    assert model.training  # the mode is given back
    fisher = compute_fisher(model.eval(), _batches(), kind="classification")
    assert set(mask) == {n for n, _ in model.named_parameters()} - HEAD  # the head is not ranked
    n = sum(m.numel() for m in mask.values())
    kept = torch.cat([fisher[k].reshape(-1)[mask[k].reshape(-1)] for k in mask])
    dropped = torch.cat([fisher[k].reshape(-1)[~mask[k].reshape(-1)] for k in mask])
    assert kept.numel() == round(reserve * n)
    assert kept.min() >= dropped.max()
    assert kept.max() > 0


def test_sgd_moves_only_the_child_and_the_head(tiny_bert_dir):
    model = _classifier(tiny_bert_dir)
    mask = regularizers.childtuning_mask(model, _batches(), reserve=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    regularizers.use_childtuning(model, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()(**_batches(1)[0]).loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    moved_in_child = 0
    for name, keep in mask.items():
        assert torch.equal(after[name].detach()[~keep], before[name][~keep]), name
        moved_in_child += int((after[name].detach()[keep] != before[name][keep]).sum())
    assert moved_in_child > 0
    for name in HEAD:
        assert not torch.equal(after[name].detach(), before[name]), name  # always trainable


def test_adamw_leaves_the_rest_to_weight_decay_alone(tiny_bert_dir):
    lr, decay = 1e-2, 0.1
    model = _classifier(tiny_bert_dir)
    mask = regularizers.childtuning_mask(model, _batches(), reserve=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    regularizers.use_childtuning(model, mask)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
    for batch in _batches(2):
        optimizer.zero_grad()
        model.train()(**batch).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in mask:
            outside = ~mask[name]
            assert (optimizer.state[param]["exp_avg"][outside] == 0).all(), name
            expected = before[name][outside] * (1 - lr * decay) ** 2
            assert torch.allclose(param.detach()[outside], expected, rtol=1e-6, atol=0), name


def test_gradients_are_masked_while_on_and_ordinary_after_removal(tiny_bert_dir):
    model = _classifier(tiny_bert_dir)
    mask = regularizers.childtuning_mask(model, _batches(), reserve=0.3)
    batch = _batches(1)[0]
    plain = _grads(copy.deepcopy(model), batch)
    regularizers.use_childtuning(model, mask)
    with pytest.raises(UsageError):
        regularizers.use_childtuning(model, mask)  # twice
    masked = _grads(model, batch)
    for name, g in plain.items():
        expected = g * mask[name] if name in mask else g
        assert torch.equal(masked[name], expected), name
    regularizers.remove_childtuning(model)
    again = _grads(model, batch)
    for name, g in plain.items():
        assert torch.equal(again[name], g), name
    assert regularizers.remove_childtuning(model) is model  # not on: a no-op


def test_bad_masks_and_reserves_are_refused(tiny_bert_dir):
    model = _classifier(tiny_bert_dir)
    for reserve in (0.0, 1.5):
        with pytest.raises(UsageError):
            regularizers.childtuning_mask(model, _batches(1), reserve=reserve)
    with pytest.raises(UsageError):
        regularizers.use_childtuning(model, {"no.such.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(UsageError):
        regularizers.use_childtuning(model, {"classifier.weight": torch.ones(3, dtype=torch.bool)})
    assert not hasattr(model, "_landscape_childtuning")
