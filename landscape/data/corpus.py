"""Corpora: read documents, sub-sample them, pack them into fixed-length samples, batch them.

``--corpus`` takes a text file (one document per non-empty line), a JSONL file (a ``text`` field
per line), a Hugging Face dataset (a ``save_to_disk`` folder, or a name when the hub is reachable)
or nothing (the embedded corpus, extracted into ``data/corpus`` at set-up time).
"""

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..errors import UsageError
from ..files import require_readable_file
from ..models import LoadedModel
from ..progress import bar as progress_bar
from ..settings import BOS_CHOICES
from .hf_datasets import open_hf_dataset
from .labelled import encode, labelled_rows, load_labelled
from .objectives import causal_sample, check_targets, mlm_sample, pad_batch, pad_token_id, span_corruption_sample
from .sampling import check_max_samples, seeded_prefix

__all__ = ["pad_token_id", "BOS_CHOICES", "sample_framing", "describe_framing", "load_documents",
           "subsample_documents", "pack_documents", "make_samples", "check_seq_len", "batches", "load_samples",
           "load_batches"]


def _read_text(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"corpus '{path}' is not UTF-8 text") from None
    except OSError as err:
        raise UsageError(f"cannot read corpus '{path}': {err.strerror}") from None


def _read_jsonl(path):
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"corpus '{path}' line {number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"corpus '{path}' line {number} has no string 'text' field")
        docs.append(record["text"])
    return docs


def _read_hf_dataset(spec):
    import datasets

    data = open_hf_dataset(spec)
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        data = data[split]
    if "text" not in data.column_names:
        raise UsageError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(data.column_names)})")
    return list(data["text"])


def load_documents(spec: Optional[str] = None) -> List[str]:
    """List of documents (str) from a corpus spec; None is the embedded corpus."""
    if spec is None:
        from .embedded_text import embedded_text

        spec = str(embedded_text("train"))
    path = Path(spec).expanduser()
    if path.is_dir():
        docs = _read_hf_dataset(str(path))
    elif path.suffix in (".jsonl", ".json"):
        docs = _read_jsonl(require_readable_file(path, "corpus"))
    elif path.exists() or path.suffix or spec.startswith((".", "/", "~")):
        docs = _read_text(require_readable_file(path, "corpus")).splitlines()
    else:
        docs = _read_hf_dataset(spec)
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise UsageError(f"corpus '{spec}' contains no text")
    return docs


def subsample_documents(docs: List[str], fraction: Optional[float] = None, seed: int = 0) -> List[str]:
    """Seeded document-level sub-sample (``sampling.seeded_prefix``), in the permutation's order.

    Nested: for the same seed, a smaller fraction is always a subset of a larger one.
    Always keeps at least one document.

    Args:
        docs: the documents.
        fraction: the fraction to keep, in (0, 1] (None: all, in seeded order).
        seed: seeds the permutation.

    Returns:
        The kept documents, in the permutation's order.
    """
    return [docs[i] for i in seeded_prefix(len(docs), fraction, seed)]


def _special_frame(tokenizer):
    """(prefix, suffix) special token ids the tokenizer wraps a single sequence in."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(content) + 1):
        if full[start: start + len(content)] == content:
            return full[:start], full[start + len(content):]
    return [], []


def sample_framing(tokenizer, bos: str = "auto"):
    """(prefix, suffix) token ids around every sample: the tokenizer's own framing of one text.

    A model measured without the BOS it always saw in pretraining is measured far from where it
    lives.

    Args:
        tokenizer: the model's tokenizer.
        bos: 'auto' keeps the tokenizer's framing (BOS first for Llama-3/Gemma-style tokenizers,
            nothing for GPT-2-style ones, [CLS] … [SEP] for BERT); 'yes' makes BOS the first token;
            'no' drops a leading BOS.

    Returns:
        (prefix, suffix): lists of token ids.

    Raises:
        UsageError: an unknown ``bos``, or 'yes' for a tokenizer without a BOS token.
    """
    if bos not in BOS_CHOICES:
        raise UsageError(f"unknown BOS setting '{bos}'; use auto, yes or no")
    prefix, suffix = _special_frame(tokenizer)
    bos_id = tokenizer.bos_token_id
    if bos == "yes":
        if bos_id is None:
            raise UsageError("this tokenizer has no BOS token, so samples cannot start with one")
        if prefix[:1] != [bos_id]:
            prefix = [bos_id] + prefix
    elif bos == "no" and bos_id is not None and prefix[:1] == [bos_id]:
        prefix = prefix[1:]
    return list(prefix), list(suffix)


def describe_framing(tokenizer, bos: str = "auto") -> str:
    """The framing as stored in provenance, e.g. 'bos=auto: <|begin_of_text|> … (none)'."""
    prefix, suffix = sample_framing(tokenizer, bos)

    def tokens(ids):
        return " ".join(tokenizer.convert_ids_to_tokens(ids)) if ids else "(none)"

    return f"bos={bos}: {tokens(prefix)} … {tokens(suffix)}"


def _token_ids(docs: List[str], tokenizer):
    """Each document's token ids in order, tokenized in doubling blocks.

    A caller that stops early (enough chunks) leaves the rest of a large corpus untokenized: a
    surface of a few samples of the embedded corpus once tokenized all of it (2 s a call).  Each
    document is tokenized on its own in a batch, so the ids are those of one call over all of them.
    """
    start, block = 0, 1  # one document often holds a few samples: 5,400 characters on average in the embedded corpus
    while start < len(docs):
        # Documents are longer than the model's positions on purpose (they are cut later): no warning.
        yield from tokenizer(list(docs[start: start + block]), add_special_tokens=False,
                             verbose=False)["input_ids"]
        start, block = start + block, block * 2


def pack_documents(docs: List[str], tokenizer, seq_len: int, separator: Optional[int] = None,
                   show_progress: bool = False, max_chunks: Optional[int] = None) -> List[List[int]]:
    """Tokenize documents and cut the concatenated stream into chunks of ``seq_len`` content tokens.

    The last chunk keeps what is left (it is shorter, not dropped).

    Args:
        docs: the documents.
        tokenizer: the model's tokenizer.
        seq_len: content tokens per chunk.
        separator: the token id documents are joined with, or None for nothing.
        show_progress: a tqdm bar over documents.
        max_chunks: stop tokenizing once the stream holds this many whole chunks (None: every
            document); the chunks returned start with the same ``max_chunks`` as without it.

    Returns:
        A list of lists of token ids.
    """
    stream = []
    # A chunk of one token is dropped by make_samples: only whole chunks of 2 or more count as enough.
    enough = max_chunks * seq_len if max_chunks is not None and seq_len >= 2 else None
    for ids in progress_bar(_token_ids(docs, tokenizer), total=len(docs), desc="packing", enabled=show_progress):
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
        if enough is not None and len(stream) >= enough:
            break
    return [stream[i: i + seq_len] for i in range(0, len(stream), seq_len)]


def make_samples(tokenizer, kind: str, docs: List[str], seq_len: int = 128, max_samples: Optional[int] = None,
                 seed: int = 0, bos: str = "auto") -> List[Dict[str, torch.Tensor]]:
    """Turn documents into samples of the objective ``kind`` ('mlm' | 'causal' | 'seq2seq').

    Every sample is framed as the tokenizer frames one text (``sample_framing``; ``bos``
    overrides the BOS token) and is ``seq_len`` tokens long, framing included.  Masked LM:
    [CLS] content [SEP] with fixed per-sample masks.  Causal LM: [BOS] content, documents
    separated by EOS.  Seq2seq: ``seq_len`` tokens of input before T5 span corruption.
    ``max_samples`` keeps the first samples (documents come in seeded order from
    ``subsample_documents``).

    Args:
        tokenizer: the model's tokenizer.
        kind: the objective: 'mlm' | 'causal' | 'seq2seq'.
        docs: the documents (str).
        seq_len: tokens per sample, framing included.
        max_samples: at most this many samples (None: all).
        seed: seeds the masks (masked LM) and span corruption (seq2seq).
        bos: 'auto' | 'yes' | 'no' (see ``sample_framing``).

    Returns:
        A list of sample dicts of 1-D tensors with ``labels`` (-100 where nothing is predicted):
        (seq_len,) for masked and causal LM; seq2seq inputs and labels are shorter after span
        corruption.

    Raises:
        UsageError: the documents produce no sample, or samples without a single target token
            (``objectives.check_targets``: e.g. masked-LM samples of unknown tokens alone), or
            ``max_samples`` is out of its domain.
    """
    if kind not in ("mlm", "causal", "seq2seq"):
        raise UsageError(f"documents make samples of a language model's objective, not of '{kind}'")
    if seq_len < 8:
        raise UsageError(f"seq-len must be at least 8, got {seq_len}")
    check_max_samples(max_samples)
    prefix, suffix = sample_framing(tokenizer, bos)
    if kind == "mlm":
        chunks = pack_documents(docs, tokenizer, seq_len - len(prefix) - len(suffix),
                                separator=tokenizer.sep_token_id, max_chunks=max_samples)
    elif kind == "causal":
        chunks = pack_documents(docs, tokenizer, seq_len - len(prefix) - len(suffix),
                                separator=tokenizer.eos_token_id, max_chunks=max_samples)
    else:
        chunks = pack_documents(docs, tokenizer, seq_len - 1, max_chunks=max_samples)
    chunks = [c for c in chunks if len(c) >= 2]
    if max_samples is not None:
        chunks = chunks[:max_samples]
    if not chunks:
        raise UsageError("the corpus produced no samples: it has no tokens after tokenization")
    special_ids = set(tokenizer.all_special_ids)
    samples = []
    for chunk in chunks:
        if kind == "mlm":
            ids = prefix + chunk + suffix
            samples.append(mlm_sample(ids, [i in special_ids for i in ids], tokenizer, seed=seed))
        elif kind == "causal":
            samples.append(causal_sample(prefix + chunk + suffix))
        else:
            samples.append(span_corruption_sample(chunk, tokenizer, seed=seed))
    check_targets(samples, kind, tokenizer)  # here, so that every stage refuses it before it writes
    return samples


def _labelled_samples(loaded, corpus, fraction, max_samples, seq_len, seed):
    """A classifier's sample: the seeded rows of a labelled dataset, one sample (and one target) each."""
    check_max_samples(max_samples)
    check_seq_len(loaded.model, seq_len)
    data, _ = load_labelled(corpus)
    data = data.select(seeded_prefix(len(data), fraction, seed)[:max_samples])
    return labelled_rows(encode(loaded.tokenizer, data, seq_len), data.labels, range(len(data)), data.task)


def check_seq_len(model: torch.nn.Module, seq_len: int) -> None:
    """Refuse sequences longer than the model's learned position table."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise UsageError(f"sequence length {seq_len} is longer than this model's {limit} positions; "
                         f"use {limit} or less")


def batches(samples: List[Dict[str, torch.Tensor]], batch_size: int, pad_id: int,
            device="cpu") -> List[Dict[str, torch.Tensor]]:
    """Collate samples into a list of batch dicts on ``device``; the last batch may be smaller.

    Args:
        samples: sample dicts of 1-D tensors (``make_samples``).
        batch_size: samples per batch (>= 1).
        pad_id: the token id that pads shorter samples (labels are padded with -100).
        device: where the batches go.

    Returns:
        A list of batch dicts of (B, T) tensors.

    Raises:
        UsageError: ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise UsageError(f"batch-size must be at least 1, got {batch_size}")
    out = []
    for start in range(0, len(samples), batch_size):
        batch = pad_batch(samples[start: start + batch_size], pad_id)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def load_samples(loaded: LoadedModel, corpus: Optional[str] = None, fraction: Optional[float] = None,
                 max_samples: Optional[int] = None, seq_len: int = 128, seed: int = 0,
                 bos: str = "auto") -> List[Dict[str, torch.Tensor]]:
    """Documents → seeded sub-sample → samples of the model's objective, as a list.

    A caller that shards samples over processes needs them before batching.  For a fine-tuned
    classifier (kind 'classification') the corpus is a labelled dataset and each sample is one row.

    Args:
        loaded: the model and tokenizer (``models.LoadedModel``).
        corpus: the corpus (None: the embedded default).
        fraction: the fraction of documents to keep, seeded (None: all).
        max_samples: at most this many samples (None: no limit).
        seq_len: tokens per sample (at most the model's positions).
        seed: seeds the sub-sample and the objective's masking.
        bos: 'auto' | 'yes' | 'no': BOS framing of samples (see ``sample_framing``).

    Returns:
        A list of sample dicts of 1-D tensors with ``labels`` (see ``make_samples``).

    Raises:
        UsageError: an unreadable corpus, ``seq_len`` longer than the model's positions, or a
            sample without a target token (``objectives.check_targets``).
    """
    if loaded.kind == "classification":
        return _labelled_samples(loaded, corpus, fraction, max_samples, seq_len, seed)
    docs = subsample_documents(load_documents(corpus), fraction, seed)
    check_seq_len(loaded.model, seq_len)
    return make_samples(loaded.tokenizer, loaded.kind, docs, seq_len, max_samples, seed, bos)


def load_batches(loaded: LoadedModel, corpus: Optional[str] = None, fraction: Optional[float] = None,
                 max_samples: Optional[int] = None, seq_len: int = 128, batch_size: int = 16, seed: int = 0,
                 device: Union[None, str, torch.device] = None, bos: str = "auto") -> List[Dict[str, torch.Tensor]]:
    """Documents → sub-sample → samples → batches for a ``models.LoadedModel``, in one call.

    For a fine-tuned classifier (kind 'classification') the corpus is a labelled dataset
    (``finetune.load_labelled``: CSV/TSV/JSONL/HF dataset; None = the embedded sentiment set) and
    each sample is one labelled row.

    Args:
        loaded: the model and tokenizer (``models.LoadedModel``).
        corpus: the corpus (None: the embedded default).
        fraction: the fraction of documents (rows) to keep, seeded (None: all).
        max_samples: at most this many samples (None: no limit).
        seq_len: tokens per sample.
        batch_size: samples per batch (the last batch may be smaller).
        seed: seeds the sub-sample and the objective's masking.
        device: where batches go (None: the model's device).
        bos: 'auto' | 'yes' | 'no' (see ``sample_framing``).

    Returns:
        A list of batch dicts of (B, T) tensors with ``labels`` (a classifier's labels are (B,)).

    Raises:
        UsageError: an unreadable corpus, settings out of their domains, or a sample without a
            target token (``objectives.check_targets``).
    """
    check_max_samples(max_samples)
    samples = load_samples(loaded, corpus, fraction, max_samples, seq_len, seed, bos)
    device = device or next(loaded.model.parameters()).device
    return batches(samples, batch_size, pad_token_id(loaded.tokenizer), device)
