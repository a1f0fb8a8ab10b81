"""Corpus: formats, seeded nested sub-sampling, packing, clear errors."""

import json

import pytest
import torch
from conftest import TEXT

from landscape.data.corpus import load_batches, load_documents, make_samples, pack_documents, subsample_documents
from landscape.errors import UsageError


def test_text_file_is_one_document_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\n\n  second doc  \n")
    assert load_documents(str(path)) == ["first doc", "second doc"]


def test_jsonl_reads_the_text_field(tiny_corpus_file):
    assert load_documents(str(tiny_corpus_file)) == TEXT


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one doc", "two doc"], "x": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(str(tmp_path / "ds")) == ["one doc", "two doc"]


def test_embedded_corpus_is_real_english():
    docs = load_documents(None)
    words = sum(len(d.split()) for d in docs)
    assert len(docs) > 100 and words > 300_000
    assert sum(" the " in d for d in docs) > 0.9 * len(docs)


def test_subsample_is_seeded_and_nested():
    docs = [f"doc {i}" for i in range(1000)]
    tenth = subsample_documents(docs, 0.1, seed=3)
    third = subsample_documents(docs, 0.33, seed=3)
    assert len(tenth) == 100 and len(third) == 330
    assert set(tenth) <= set(third)
    assert tenth == subsample_documents(docs, 0.1, seed=3)
    assert tenth != subsample_documents(docs, 0.1, seed=4)
    assert len(subsample_documents(docs[:3], 0.01)) == 1  # never empty


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_fraction_outside_unit_interval_is_refused(fraction):
    with pytest.raises(UsageError, match=r"fraction must be in \(0, 1\]"):
        subsample_documents(["a"], fraction)


def test_packing_keeps_the_last_partial_chunk(tiny_bert):
    chunks = pack_documents(TEXT, tiny_bert.tokenizer, 10)
    n_tokens = sum(len(tiny_bert.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXT)
    assert sum(len(c) for c in chunks) == n_tokens
    assert all(len(c) == 10 for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= 10


def test_mlm_samples_have_the_asked_length_and_max_samples(tiny_bert):
    samples = make_samples(tiny_bert.tokenizer, "mlm", TEXT, seq_len=16, max_samples=5)
    assert len(samples) == 5
    assert all(len(s["input_ids"]) == 16 for s in samples)
    assert samples[0]["input_ids"][0] == tiny_bert.tokenizer.cls_token_id


class _Counting:
    """A tokenizer that counts the documents it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.documents = tokenizer, 0

    def __call__(self, texts, **options):
        self.documents += len(texts)
        return self.tokenizer(texts, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_few_samples_of_a_large_corpus_tokenize_only_the_documents_they_need(tiny_llama, tiny_t5):
    # Every surface of the demo once tokenized the whole embedded corpus for its few samples.
    docs = [f"{TEXT[i % len(TEXT)]} ({i})" for i in range(2000)]
    for loaded in (tiny_llama, tiny_t5):
        counting = _Counting(loaded.tokenizer)
        few = make_samples(counting, loaded.kind, docs, seq_len=16, max_samples=3)
        assert counting.documents < 200, loaded.kind
        whole = make_samples(loaded.tokenizer, loaded.kind, docs, seq_len=16)  # the same first 3 samples
        assert len(few) == 3 and len(whole) > 500
        for a, b in zip(few, whole[:3]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), loaded.kind


def test_a_sample_limit_past_the_corpus_gives_every_sample(tiny_bert):
    every = make_samples(tiny_bert.tokenizer, "mlm", TEXT, seq_len=16)
    more = make_samples(tiny_bert.tokenizer, "mlm", TEXT, seq_len=16, max_samples=len(every) + 5)
    assert len(more) == len(every) and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(more, every))


def test_load_batches_end_to_end(tiny_gpt2, tiny_corpus_file):
    batches = load_batches(tiny_gpt2, corpus=str(tiny_corpus_file), fraction=0.5, seq_len=16, batch_size=4)
    rows = sum(b["input_ids"].shape[0] for b in batches)
    assert rows >= 2 and all(b["input_ids"].shape[1] <= 16 for b in batches)


def test_empty_corpus_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n   \n")
    with pytest.raises(UsageError, match="contains no text"):
        load_documents(str(path))


def test_missing_and_unreadable_corpus_are_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(UsageError, match="line 2 is not valid JSON"):
        load_documents(str(bad))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_documents(str(binary))


def test_seq_len_beyond_the_models_positions_is_refused(tiny_bert, tiny_corpus_file):
    limit = tiny_bert.model.config.max_position_embeddings
    with pytest.raises(UsageError, match=f"use {limit} or less"):
        load_batches(tiny_bert, corpus=str(tiny_corpus_file), seq_len=limit + 1)
