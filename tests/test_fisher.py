"""Exact diagonal empirical Fisher: equals a per-sample loop, resumes, shards over ranks."""

import copy
import subprocess

import pytest
import torch
from conftest import landscape_cmd, subprocess_env

from landscape import cli
from landscape.data.corpus import load_batches
from landscape.data.objectives import sequence_losses
from landscape.errors import UsageError
from landscape.fisher import compute_fisher, load_fisher, nested_fisher


def loop_fisher(model, batches, kind):
    """Reference: one backward per sample (row of the same padded batch), float64 accumulation."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for batch in batches:
        for row in range(batch["labels"].shape[0]):
            sample = {k: v[row: row + 1] for k, v in batch.items()}
            loss = sequence_losses(model, sample, kind).mean_per_sample()[0]
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    sums[name] += grad.double() ** 2
            count += 1
    return {n: s / count for n, s in sums.items()}


def assert_same_fisher(fisher, reference, rtol=1e-5):
    assert set(fisher) == set(reference)
    scale = max(float(r.abs().max()) for r in reference.values())
    for name, ref in reference.items():
        # Parameters with a Fisher of exactly zero in theory (attention key biases) are rounding
        # noise in both; compare those against a floor far below every real value.
        bound = rtol * max(float(ref.abs().max()), 1e-8 * scale)
        err = float((fisher[name].double() - ref).abs().max())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def small_batches(loaded, corpus, batch_size=3, max_samples=7, seq_len=16):
    return load_batches(loaded, corpus, max_samples=max_samples, seq_len=seq_len, batch_size=batch_size)


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_t5"])
def test_compute_fisher_equals_per_sample_loop(name, request, tiny_corpus_file):
    loaded = request.getfixturevalue(name)
    batches = small_batches(loaded, tiny_corpus_file, batch_size=5, max_samples=None)
    assert any((b["attention_mask"] == 0).any() for b in batches), "want padding inside a batch"
    fisher = compute_fisher(loaded.model, batches, kind=loaded.kind)
    assert_same_fisher(fisher, loop_fisher(loaded.model, batches, loaded.kind))
    for n, p in loaded.model.named_parameters():
        assert fisher[n].shape == p.shape and p.requires_grad  # requires_grad restored


def test_tied_weights_appear_once_and_sum_both_uses(tiny_bert, tiny_gpt2, tiny_corpus_file):
    bert_names = set(compute_fisher(tiny_bert.model, small_batches(tiny_bert, tiny_corpus_file), kind=tiny_bert.kind))
    assert "bert.embeddings.word_embeddings.weight" in bert_names
    assert "cls.predictions.decoder.weight" not in bert_names
    model = tiny_gpt2.model
    assert model.lm_head.weight is model.transformer.wte.weight
    batches = small_batches(tiny_gpt2, tiny_corpus_file)
    fisher = compute_fisher(model, batches, kind=tiny_gpt2.kind)
    assert "lm_head.weight" not in fisher
    # Squaring each use separately (what a tie-unaware method does) gives a different number.
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    separate = compute_fisher(untied, batches, kind=tiny_gpt2.kind)
    squared_separately = separate["transformer.wte.weight"] + separate["lm_head.weight"]
    assert not torch.allclose(fisher["transformer.wte.weight"], squared_separately, rtol=1e-2)


def test_nested_fisher_prefixes_match_separate_runs(tiny_gpt2, tiny_corpus_file):
    batches = small_batches(tiny_gpt2, tiny_corpus_file, batch_size=3, max_samples=7)
    full, first4 = nested_fisher(tiny_gpt2.model, batches, [7, 4], kind=tiny_gpt2.kind)
    prefix = [{k: v[:3] for k, v in batches[0].items()}, {k: v[:1] for k, v in batches[1].items()}]
    assert_same_fisher(full, {k: v.double() for k, v in compute_fisher(tiny_gpt2.model, batches,
                                                                       kind=tiny_gpt2.kind).items()})
    assert_same_fisher(first4, {k: v.double() for k, v in compute_fisher(tiny_gpt2.model, prefix,
                                                                         kind=tiny_gpt2.kind).items()})


def test_interrupted_run_resumes_without_redoing_batches(tiny_bert, tiny_corpus_file, tmp_path):
    batches = small_batches(tiny_bert, tiny_corpus_file, batch_size=2, max_samples=8)
    expected = compute_fisher(tiny_bert.model, batches, kind=tiny_bert.kind)
    checkpoint = tmp_path / "F.ckpt"

    def interrupted():
        yield from batches[:2]
        raise KeyboardInterrupt  # Ctrl-C between batch 2 and 3

    with pytest.raises(KeyboardInterrupt):
        compute_fisher(tiny_bert.model, interrupted(), checkpoint=checkpoint, fingerprint="run-1", kind=tiny_bert.kind)
    assert checkpoint.exists()
    forwards = []
    handle = tiny_bert.model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        resumed = compute_fisher(tiny_bert.model, batches, checkpoint=checkpoint, fingerprint="run-1",
                                 kind=tiny_bert.kind)
    finally:
        handle.remove()
    assert len(forwards) == len(batches) - 2  # finished batches were not redone
    assert_same_fisher(resumed, {k: v.double() for k, v in expected.items()})
    with pytest.raises(UsageError, match="other settings"):
        compute_fisher(tiny_bert.model, batches, checkpoint=checkpoint, fingerprint="run-2", kind=tiny_bert.kind)


def test_cli_fisher_writes_file_with_provenance(tiny_bert, tiny_bert_dir, tiny_corpus_file, tmp_path, capsys):
    out = tmp_path / "F.safetensors"
    code = cli.main(["fisher", "--model", str(tiny_bert_dir), "--corpus", str(tiny_corpus_file),
                     "--max-samples", "6", "--seq-len", "16", "--batch-size", "4", "--device", "cpu",
                     "--out", str(out), "--quiet"])
    assert code == 0
    fisher, meta = load_fisher(out)
    assert meta["samples"] == "6" and meta["model"] == str(tiny_bert_dir)
    assert meta["corpus"] == str(tiny_corpus_file) and meta["seed"] == "0" and "definition" in meta
    assert set(fisher) == {n for n, _ in tiny_bert.model.named_parameters()}
    batches = small_batches(tiny_bert, tiny_corpus_file, batch_size=4, max_samples=6)
    assert_same_fisher(fisher, {k: v.double() for k, v in compute_fisher(tiny_bert.model, batches,
                                                                         kind=tiny_bert.kind).items()},
                       rtol=1e-5)
    assert not list(tmp_path.glob("*.ckpt"))  # the checkpoint is removed after success


def test_cli_fisher_bad_input_is_one_line_and_no_output(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "F.safetensors"
    code = cli.main(["fisher", "--model", str(tiny_bert_dir), "--corpus", str(tmp_path / "missing.txt"),
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert cli.main(["fisher", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "F.bin")]) == 2


@pytest.mark.distributed
def test_torchrun_two_gloo_ranks_equal_single_process(tiny_gpt2, tiny_gpt2_dir, tiny_corpus_file, tmp_path):
    out = tmp_path / "F2.safetensors"
    cmd = landscape_cmd("fisher", "--model", tiny_gpt2_dir, "--corpus", tiny_corpus_file, "--max-samples", "7",
                        "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--quiet", "--out", out, ranks=2)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=subprocess_env())
    assert result.returncode == 0, result.stderr  # whole: a rank's own error comes first
    fisher, meta = load_fisher(out)
    assert meta["ranks"] == "2" and meta["samples"] == "7"
    batches = small_batches(tiny_gpt2, tiny_corpus_file, batch_size=7, max_samples=7)
    expected = compute_fisher(tiny_gpt2.model, batches, kind=tiny_gpt2.kind)
    assert_same_fisher(fisher, {k: v.double() for k, v in expected.items()})


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2"])
def test_row_blocks_and_sample_slices_equal_whole_tensors(name, request, tiny_corpus_file):
    """A budget smaller than one sample's gradient of a tensor (row blocks of it) and a batch run
    in slices of samples give the same Fisher as whole tensors and whole batches."""
    from landscape.fisher import FisherAccumulator

    loaded = request.getfixturevalue(name)
    batches = small_batches(loaded, tiny_corpus_file, batch_size=5, max_samples=None)
    reference = {k: v.double() for k, v in compute_fisher(loaded.model, batches, kind=loaded.kind).items()}
    accumulator = FisherAccumulator(loaded.model, max_chunk_mb=0.01, kind=loaded.kind)  # ~2600 floats: row blocks
    accumulator.pass_bytes = 1  # one sample per forward and backward
    assert any(p.numel() > accumulator.chunk_elements for p in accumulator.params.values())
    for batch in batches:
        accumulator.add_batch(batch)
    assert_same_fisher(accumulator.fisher(0), reference)


def test_fisher_file_is_streamed_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from landscape.fisher import save_fisher

    fisher = {"b.weight": torch.rand(7, 3), "a.bias": torch.rand(5), "c": torch.rand(())}
    save_fisher(tmp_path / "F.safetensors", fisher, {"model": "m", "samples": 3})
    loaded = load_file(str(tmp_path / "F.safetensors"))
    assert all(torch.equal(loaded[n], t) for n, t in fisher.items())
    with safe_open(str(tmp_path / "F.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"model": "m", "samples": "3", "format": "landscape-fisher-v1"}


def test_cache_blocks_stay_within_the_budget_and_the_cache():
    """On a CPU, a tensor formed in row blocks gets blocks of at most the cache's size; whole tensors
    and sample chunks stay as they were, and without a cache (a GPU) so do the blocks."""
    from landscape.fisher.budget import chunk_and_block

    # SmolLM2's tied 49152 x 576 embedding, a 64 MB budget, 1M-element cache blocks.
    assert chunk_and_block(4, 49152, 576, 16 * 2**20) == (1, 16 * 2**20 // 576)  # no cache
    assert chunk_and_block(4, 49152, 576, 16 * 2**20, 2**20) == (1, 2**20 // 576)
    assert chunk_and_block(4, 1536, 576, 16 * 2**20, 2**20) == (18, 1536)  # a layer's weight: whole
    assert chunk_and_block(8, 100, 5000, 1000, 2**20) == (1, 1)  # a row wider than both: one row


def test_cache_blocks_give_the_same_bits(tiny_bert, tiny_corpus_file):
    """Cache-sized row blocks give the Fisher of tensors already in row blocks bit for bit (BERT's
    linear layers; GPT-2's Conv1D blocks, formed along input features, can differ in the last bit)."""
    from landscape.fisher import FisherAccumulator

    loaded = tiny_bert
    batches = small_batches(loaded, tiny_corpus_file, batch_size=5, max_samples=None)
    results = []
    for cache in (None, 1000):
        accumulator = FisherAccumulator(loaded.model, kind=loaded.kind, max_chunk_mb=0.01)  # row blocks
        accumulator.cache_elements = cache
        for batch in batches:
            accumulator.add_batch(batch)
        results.append(accumulator.fisher(0))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_causal_decoder_rows_are_viewed_not_copied():
    """A causal LM's target rows, the same number in every sample, are laid out per sample as a view:
    no logits-sized padded copy of the decoder's output gradient."""
    from landscape.fisher.accumulator import _Call

    rows = torch.randn(4 * 7, 11)  # 4 samples x 7 target rows, (M, vocabulary)
    call = _Call("lm_head", rows, row_sample=torch.arange(4).repeat_interleave(7))
    laid_out = call.samples(rows, 4, 1, 3)
    assert torch.equal(laid_out, rows.view(4, 7, 11)[1:3])
    assert laid_out.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
    padded = _Call("lm_head", rows[:-1], row_sample=torch.arange(4).repeat_interleave(7)[:-1])
    out = padded.samples(rows[:-1], 4, 2, 4)  # the last sample has 6 rows: padded with a zero row
    assert out.shape == (2, 7, 11) and torch.equal(out[1, 6], torch.zeros(11))
    assert torch.equal(out[0], rows[14:21]) and torch.equal(out[1, :6], rows[21:27])
