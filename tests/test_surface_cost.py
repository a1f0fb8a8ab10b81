"""What a surface point costs: the output projection only at target rows (masked and causal LMs),
and the in-place perturbation formed in float32 with a cached grid row, whatever the visiting order."""

import pytest
import torch

from landscape import directions, surface
from landscape.data.corpus import load_batches
from landscape.data.objectives import IGNORE_INDEX, pad_batch, sequence_losses
from landscape.fisher import compute_fisher
from landscape.surface.perturbation import InPlacePerturbation


def _ragged_batch(loaded, tiny_corpus_file):
    """A padded batch of samples of different lengths (pad labels are -100)."""
    full = load_batches(loaded, str(tiny_corpus_file), max_samples=3, seq_len=16, batch_size=3)[0]
    samples = [{k: v[row, : 16 - 5 * row] for k, v in full.items()} for row in range(3)]
    return pad_batch(samples, loaded.tokenizer.pad_token_id or 0)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_causal_projection_runs_only_on_target_rows(name, request, tiny_corpus_file):
    loaded = request.getfixturevalue(name)
    batch = _ragged_batch(loaded, tiny_corpus_file)
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert targets < batch["labels"][:, 1:].numel()  # the padding really is left out
    seen = []
    handle = loaded.model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with torch.no_grad():
        ours = sequence_losses(loaded.model, batch, loaded.kind)
        theirs = loaded.model(**batch)
    handle.remove()
    assert seen[0] == torch.Size([targets, loaded.model.config.vocab_size])
    assert float(ours.n_tokens.sum()) == targets
    mean = ours.loss_sum.sum() / ours.n_tokens.sum()
    torch.testing.assert_close(mean, theirs.loss, rtol=1e-5, atol=1e-6)
    correct = (theirs.logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])[batch["labels"][:, 1:] != IGNORE_INDEX]
    assert float(ours.n_correct.sum()) == float(correct.sum())


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_causal_fisher_matches_a_per_sample_loop(name, request, tiny_corpus_file):
    """The Fisher hooks see the projection on target rows only and still give exact per-sample grads."""
    loaded = request.getfixturevalue(name)
    model = loaded.model
    batch = _ragged_batch(loaded, tiny_corpus_file)
    fisher = compute_fisher(model, [batch], kind=loaded.kind)
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in range(batch["labels"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        sample = {k: v[row: row + 1, :length] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        sequence_losses(model, sample, loaded.kind).mean_per_sample().sum().backward()
        for n, p in params.items():
            if p.grad is not None:
                expected[n] += p.grad.square() / batch["labels"].shape[0]
    model.zero_grad(set_to_none=True)
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10, msg=n)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbation_does_not_depend_on_the_order_or_on_streaming(tiny_llama, dtype):
    model = tiny_llama.model.to(dtype)
    base = _weights(model)
    dirs, _ = directions.make_directions(model, dims=2, seed=0)
    points = [(-0.5, -0.5), (0.5, -0.5), (0.0, 0.25), (0.25, 0.0), (0.0, 0.0), (-1.0, 0.25)]
    held, streamed = InPlacePerturbation(model, dirs), InPlacePerturbation(model, dirs, stream=True)
    # Held on the device in the model's dtype; streamed from the host in float32.
    held_dirs = [{n: t.to(dtype).float() for n, t in d.items()} for d in dirs]
    seen = {}
    for point in points + points[::-1]:
        for perturbation, used in ((held, held_dirs), (streamed, dirs)):
            perturbation.set(point)
            now = _weights(model)
            if (point, perturbation.stream) in seen:  # the same bits whatever came before
                assert all(torch.equal(now[n], seen[point, perturbation.stream][n]) for n in now), point
            seen[point, perturbation.stream] = now
            # formed in float32: (base + y·dy) + x·dx, then one rounding to the model's dtype
            for n, d in used[0].items():
                if d.any():
                    x, y = point
                    want = base[n].float()
                    want = torch.add(want, used[1][n], alpha=y) if y else want
                    want = torch.add(want, d, alpha=x) if x else want
                    assert torch.equal(now[n], want.to(dtype)), (n, point)
    held.restore()
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters())


def test_surface_values_do_not_depend_on_the_points_visited(tiny_gpt2, tiny_corpus_file):
    batches = load_batches(tiny_gpt2, str(tiny_corpus_file), max_samples=4, seq_len=16, batch_size=2)
    dirs, _ = directions.make_directions(tiny_gpt2.model, dims=2, seed=0)
    xs, ys = [-1.0, 0.0, 0.5], [-0.5, 0.0, 1.0]
    grid = surface.evaluate(tiny_gpt2.model, dirs, batches, xs, ys, kind=tiny_gpt2.kind)
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            alone = surface.evaluate(tiny_gpt2.model, dirs, batches, [x, x + 1.0], [y, y + 1.0],
                                     kind=tiny_gpt2.kind)[0, 0]
            assert alone == grid[iy, ix]
    assert grid[1, 1] == surface.loss_and_accuracy(tiny_gpt2.model, batches, tiny_gpt2.kind)[0]
