"""Objectives: deterministic per-sample masks, and losses equal to the models' own."""

import torch
from conftest import TEXT

from landscape.data.corpus import batches, make_samples
from landscape.data.objectives import IGNORE_INDEX, mlm_sample, pad_batch, sequence_losses


def _specials(tokenizer, ids):
    return [i in set(tokenizer.all_special_ids) for i in ids]


def test_mlm_masks_are_fixed_per_text_and_seed(tiny_bert):
    tok = tiny_bert.tokenizer
    ids = tok(" ".join(TEXT))["input_ids"][:60]
    a = mlm_sample(ids, _specials(tok, ids), tok, seed=0)
    b = mlm_sample(ids, _specials(tok, ids), tok, seed=0)
    c = mlm_sample(ids, _specials(tok, ids), tok, seed=1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


def test_mlm_masks_do_not_depend_on_batching(tiny_bert):
    tok = tiny_bert.tokenizer
    whole = make_samples(tok, "mlm", TEXT, seq_len=24)
    alone = make_samples(tok, "mlm", TEXT[:1], seq_len=24)
    # The first sample's tokens are the same in both, so its masks must be too.
    if torch.equal(whole[0]["labels"] != IGNORE_INDEX, alone[0]["labels"] != IGNORE_INDEX):
        assert torch.equal(whole[0]["input_ids"], alone[0]["input_ids"])


def test_mlm_masking_rates_and_special_tokens(tiny_bert):
    tok = tiny_bert.tokenizer
    n_targets = n_maskable = n_mask_token = n_kept = 0
    for seed in range(200):
        ids = tok(TEXT[seed % len(TEXT)] + " " + TEXT[(seed + 1) % len(TEXT)])["input_ids"]
        special = torch.tensor(_specials(tok, ids))
        sample = mlm_sample(ids, special.tolist(), tok, seed=seed)
        targets = sample["labels"] != IGNORE_INDEX
        assert not (targets & special).any(), "special tokens must never be targets"
        n_targets += int(targets.sum())
        n_maskable += int((~special).sum())
        n_mask_token += int((sample["input_ids"][targets] == tok.mask_token_id).sum())
        n_kept += int((sample["input_ids"][targets] == torch.tensor(ids)[targets]).sum())
    assert 0.12 < n_targets / n_maskable < 0.19
    assert 0.74 < n_mask_token / n_targets < 0.86
    assert 0.05 < n_kept / n_targets < 0.17  # 10% kept, plus random draws that hit the same token


def test_span_corruption_hides_spans_behind_sentinels(tiny_t5):
    tok = tiny_t5.tokenizer
    samples = make_samples(tok, "seq2seq", TEXT, seq_len=32)
    ids = tok(" ".join(TEXT), add_special_tokens=False)["input_ids"][:31]
    sample = samples[0]
    # Rebuild the original from the corrupted input and the target: sentinel i -> its span.
    sentinel = {tok.convert_tokens_to_ids(f"<extra_id_{i}>"): i for i in range(20)}
    spans, current = {}, None
    for t in sample["labels"].tolist()[:-1]:
        if t in sentinel:
            current = sentinel[t]
            spans[current] = []
        else:
            spans[current].append(t)
    rebuilt = []
    for t in sample["input_ids"].tolist()[:-1]:
        rebuilt += spans[sentinel[t]] if t in sentinel else [t]
    assert rebuilt == ids
    hidden = sum(len(s) for s in spans.values())
    assert 1 <= hidden <= 0.3 * len(ids)
    assert sample["input_ids"][-1] == tok.eos_token_id == sample["labels"][-1]


def _hf_loss(model, batch):
    """The model's own loss: mean CE over all target tokens, full-vocabulary logits."""
    return model(**batch).loss


def test_losses_equal_the_models_own(tiny_bert, tiny_gpt2, tiny_t5):
    for loaded in (tiny_bert, tiny_gpt2, tiny_t5):
        samples = make_samples(loaded.tokenizer, loaded.kind, TEXT, seq_len=24)
        pad = loaded.tokenizer.pad_token_id
        batch = batches(samples, 5, pad)[0]
        with torch.no_grad():
            ours = sequence_losses(loaded.model, batch, loaded.kind)
            theirs = _hf_loss(loaded.model, batch)
        mean = ours.loss_sum.sum() / ours.n_tokens.sum()
        torch.testing.assert_close(mean, theirs, rtol=1e-5, atol=1e-6, msg=loaded.kind)


def test_mlm_projection_runs_only_on_masked_positions(tiny_bert):
    samples = make_samples(tiny_bert.tokenizer, "mlm", TEXT, seq_len=24)
    batch = pad_batch(samples[:4], tiny_bert.tokenizer.pad_token_id)
    seen = []
    handle = tiny_bert.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        sequence_losses(tiny_bert.model, batch, tiny_bert.kind)
    handle.remove()
    assert seen == [torch.Size([int((batch["labels"] != IGNORE_INDEX).sum()), len(tiny_bert.tokenizer)])]
