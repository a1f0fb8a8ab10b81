"""Training objectives as data (masks, targets) and as per-sample losses.

Every objective turns a token sequence into one *sample*: a dict of 1-D tensors with
``input_ids``, ``attention_mask`` and ``labels`` (-100 = not a target).  Randomness (which tokens
are masked or corrupted) is seeded by the sample's own tokens, so the same text always gets the
same targets, whatever batch or process it lands in.

``sequence_losses(model, batch, kind)`` gives per-sample sums of target-token cross-entropy, the
number of target tokens and the number predicted correctly; every stage (Fisher, surfaces,
fine-tuning evaluation) measures loss through it, with the objective ``kind`` the model was loaded
with (``models.LoadedModel.kind``).

A *target token* is a label other than -100 that the objective scores: every such label of a
masked-LM or seq2seq sample, every one after the first position of a causal-LM sample (position t
predicts t+1), and the one label of a classifier's row.  ``check_targets`` refuses a sample (the
whole set of sequences a stage evaluates) with no target token.
"""

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..models import check_kind

IGNORE_INDEX = -100


def sample_generator(token_ids, seed):
    """A torch.Generator seeded by ``seed`` and the sample's tokens (stable across runs)."""
    data = torch.as_tensor(token_ids, dtype=torch.int64).cpu().numpy().tobytes()
    gen = torch.Generator()
    gen.manual_seed((zlib.crc32(data) + 1_000_003 * int(seed)) % (2**63 - 1))
    return gen


def mlm_sample(token_ids, special_mask, tokenizer, seed=0, mask_prob=0.15):
    """BERT masking of one sequence.

    ``mask_prob`` (15%) of non-special tokens are targets, of which 80% become [MASK], 10% a random
    token and 10% stay; at least one target when any token is maskable.

    Args:
        token_ids: (T,) int token ids, already with special tokens.
        special_mask: (T,) bool, True at special tokens (never targets).
        tokenizer: the model's tokenizer (its [MASK] id and vocabulary size).
        seed: seeds the choice of targets and random tokens.
        mask_prob: the fraction of non-special tokens that are targets.

    Returns:
        A sample dict of (T,) tensors: ``input_ids``, ``attention_mask`` and ``labels`` (the
        original id at targets, -100 elsewhere).

    Raises:
        UsageError: the tokenizer has no [MASK] token.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    special = torch.as_tensor(special_mask, dtype=torch.bool)
    if tokenizer.mask_token_id is None:
        raise UsageError("the tokenizer has no [MASK] token, so the masked-LM objective cannot be used")
    gen = sample_generator(ids, seed)
    draw = torch.rand(ids.shape, generator=gen)
    draw[special] = 2.0  # never selected
    targets = draw < mask_prob
    if not targets.any() and (~special).any():
        targets[draw.argmin()] = True
    action = torch.rand(ids.shape, generator=gen)
    random_tokens = torch.randint(len(tokenizer), ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[targets & (action < 0.8)] = tokenizer.mask_token_id
    replace = targets & (action >= 0.8) & (action < 0.9)
    inputs[replace] = random_tokens[replace]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[targets] = ids[targets]
    return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}


def causal_sample(token_ids):
    """Causal LM: every token is a target of the one before it (the model shifts internally)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _random_segmentation(total, num_segments, gen):
    """Split ``total`` items into ``num_segments`` non-empty parts, uniformly at random."""
    if num_segments <= 1:
        return [total]
    cuts = torch.randperm(total - 1, generator=gen)[: num_segments - 1].sort().values + 1
    bounds = [0] + cuts.tolist() + [total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def span_corruption_sample(token_ids, tokenizer, seed=0, noise_density=0.15, mean_span=3.0):
    """T5 span corruption of one sequence (no special tokens in ``token_ids``).

    About ``noise_density`` of the tokens, in spans of mean length ``mean_span``, are replaced in the
    input by sentinels <extra_id_i>; the target lists each sentinel followed by the span it hides,
    then EOS.

    Args:
        token_ids: the sequence's token ids (no special tokens).
        tokenizer: a T5-style tokenizer with sentinel tokens.
        seed: seeds the spans.
        noise_density: the fraction of tokens hidden.
        mean_span: the mean span length, in tokens.

    Returns:
        A sample dict of 1-D tensors: ``input_ids``, ``attention_mask`` and ``labels``.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    length = len(ids)
    sentinel0 = tokenizer.convert_tokens_to_ids("<extra_id_0>")
    if sentinel0 is None or sentinel0 == tokenizer.unk_token_id:
        raise UsageError("the tokenizer has no <extra_id_N> sentinels, so T5 span corruption cannot be used")
    eos = tokenizer.eos_token_id
    gen = sample_generator(ids, seed)
    num_noise = min(max(1, round(length * noise_density)), length - 1)
    num_spans = max(1, min(round(num_noise / mean_span), num_noise, length - num_noise))
    noise_lengths = _random_segmentation(num_noise, num_spans, gen)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, gen)
    inputs, targets, pos = [], [], 0
    for i, (keep, noise) in enumerate(zip(keep_lengths, noise_lengths)):
        sentinel = tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>")
        inputs += ids[pos: pos + keep].tolist() + [sentinel]
        pos += keep
        targets += [sentinel] + ids[pos: pos + noise].tolist()
        pos += noise
    inputs.append(eos)
    targets.append(eos)
    input_ids = torch.tensor(inputs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor(targets, dtype=torch.long)}


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else EOS (GPT-2 style), else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def pad_batch(samples, pad_token_id: int) -> dict:
    """Pad a list of sample dicts to one batch dict of (B, T) tensors.

    The one padding rule: ``input_ids`` (and ``decoder_input_ids``) take ``pad_token_id``,
    ``labels`` take -100 (ignored), every other key (attention and token-type masks) takes 0.
    0-D values (a classifier's label) are stacked to (B,).
    """
    batch = {}
    for key in samples[0]:
        if samples[0][key].dim() == 0:
            batch[key] = torch.stack([s[key] for s in samples])
            continue
        width = max(len(s[key]) for s in samples)
        fill = IGNORE_INDEX if key == "labels" else (pad_token_id if key.endswith("input_ids") else 0)
        out = torch.full((len(samples), width), fill, dtype=samples[0][key].dtype)
        for row, sample in enumerate(samples):
            out[row, : len(sample[key])] = sample[key]
        batch[key] = out
    return batch


@dataclass
class SequenceLosses:
    """Per-sample sums over target tokens; shapes (B,)."""

    loss_sum: torch.Tensor  # summed cross-entropy, nats
    n_tokens: torch.Tensor  # number of target tokens
    n_correct: torch.Tensor  # targets whose argmax prediction is right

    def mean_per_sample(self):
        """ℓ_n: mean target-token cross-entropy of each sequence, (B,)."""
        return self.loss_sum / self.n_tokens.clamp(min=1)


def _per_sample(token_loss, token_correct, sample_index, batch_size):
    zeros = torch.zeros(batch_size, dtype=token_loss.dtype, device=token_loss.device)
    loss_sum = zeros.index_add(0, sample_index, token_loss)
    n_tokens = torch.zeros_like(zeros).index_add(0, sample_index, torch.ones_like(token_loss))
    n_correct = torch.zeros_like(zeros).index_add(0, sample_index, token_correct.to(token_loss.dtype))
    return SequenceLosses(loss_sum, n_tokens, n_correct)


def _token_losses(logits, targets):
    logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets


def _logits_at(model, inputs, rows, cols, shift):
    """Logits only where they are needed.

    The output projection (the expensive part, a (rows, vocabulary) matrix) runs on the hidden
    states at positions (rows, cols + shift) alone.

    A pre-hook on the output embeddings selects those rows, so the body runs unchanged and the
    full (B, T, V) logits are never formed.  Returns (M, V) logits, or None when the model has no
    output embeddings or calls them on something other than (B, T, H) hidden states.
    """
    decoder = model.get_output_embeddings()
    if decoder is None:
        return None
    batch_size, length = inputs["input_ids"].shape[:2]
    selected = []

    def keep_targets(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != (batch_size, length):
            return None
        selected.append(True)
        return (hidden[rows, cols + shift],) + tuple(args[1:])

    handle = decoder.register_forward_pre_hook(keep_targets)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    if not selected or logits.dim() != 2:
        return None
    return logits


def _mlm_losses(model, batch):
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = _logits_at(model, inputs, rows, cols, 0)  # (M, V)
    if logits is None:
        logits = model(**inputs).logits[rows, cols]
    token_loss, correct = _token_losses(logits, labels[rows, cols])
    return _per_sample(token_loss, correct, rows, labels.shape[0])


def _causal_losses(model, batch):
    labels = batch["labels"]
    inputs = dict({k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    # Position t predicts token t+1: the targets are labels[:, 1:], read at hidden positions t.
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = _logits_at(model, inputs, rows, cols, 0)  # (M, V)
    if logits is None:
        logits = model(**inputs).logits[rows, cols]
    token_loss, correct = _token_losses(logits, labels[rows, cols + 1])
    return _per_sample(token_loss, correct, rows, labels.shape[0])


def _seq2seq_losses(model, batch):
    labels = batch["labels"]
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_input_ids, use_cache=False).logits
    is_target = labels != IGNORE_INDEX
    token_loss, correct = _token_losses(logits[is_target], labels[is_target])
    return _per_sample(token_loss, correct, is_target.nonzero()[:, 0], labels.shape[0])


def _classification_losses(model, batch):
    """Losses of fine-tuned sequence classifiers: one target per sample (its label).

    Regression heads (one output) give the squared error and count no correct predictions.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # (B, C)
    ones = torch.ones(labels.shape[0], dtype=logits.dtype, device=logits.device)
    if logits.shape[-1] == 1:
        return SequenceLosses((logits[:, 0] - labels.float()) ** 2, ones, torch.zeros_like(ones))
    loss = F.cross_entropy(logits, labels, reduction="none")
    return SequenceLosses(loss, ones, (logits.argmax(-1) == labels).to(logits.dtype))


def sequence_losses(model, batch, kind: str) -> SequenceLosses:
    """Per-sample target-token cross-entropy sums of ``model`` on ``batch``.

    The token-weighted mean loss of a set of batches is sum(loss_sum) / sum(n_tokens).

    Args:
        model: the model.
        batch: dict of (B, T) tensors on the model's device with ``labels`` (-100 = ignored).
        kind: 'mlm' | 'causal' | 'seq2seq' | 'classification': the objective the model was loaded
            with (``models.LoadedModel.kind``); never guessed from the model's class.

    Returns:
        ``SequenceLosses`` of (B,) tensors: summed cross-entropy (nats), target tokens, correct
        predictions.

    Raises:
        UsageError: ``kind`` is not an objective.
    """
    losses = {"mlm": _mlm_losses, "causal": _causal_losses, "seq2seq": _seq2seq_losses,
              "classification": _classification_losses}
    return losses[check_kind(kind)](model, batch)


def target_tokens(sample: dict, kind: str) -> int:
    """The number of target tokens of one sample or batch dict under the objective ``kind``.

    Targets are the labels other than -100, less each causal-LM sequence's first position (nothing
    precedes it to predict it from); a classifier's row is one target.
    """
    labels = sample["labels"]
    if check_kind(kind) == "classification":
        return int(labels.numel())
    if kind == "causal":
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def check_targets(samples, kind: str, tokenizer=None) -> None:
    """Refuse a sample with no target token in all of its sequences.

    Every stage would otherwise measure nothing (an all-zero Fisher, a surface of NaN).  A sample
    whose *some* sequences (or batches) have no target is accepted: the totals are over the whole
    sample (a sequence without targets adds nothing to a loss, and a zero gradient to the Fisher
    while it counts as one of its N samples).

    Args:
        samples: the sample's sequences or batches (dicts with ``labels``).
        kind: the objective (``models.LoadedModel.kind``).
        tokenizer: the model's tokenizer, to name its unknown token in the message (or None).

    Raises:
        UsageError: no target token in any of them.
    """
    if any(target_tokens(sample, kind) for sample in samples):
        return
    count = sum(int(s["labels"].shape[0]) if s["labels"].dim() > 1 else 1 for s in samples)
    unknown = getattr(tokenizer, "unk_token", None) or "the unknown token"
    why = (f"every token is {unknown} or another special token, which the masked-LM objective never predicts "
           "(text outside the tokenizer's vocabulary, or words too long to split)"
           if kind == "mlm" else f"the {kind} objective finds no token to predict")
    raise UsageError(f"the sample has no target token: in its {count} sequence{'s' if count != 1 else ''} {why}; "
                     "use a corpus in the model's language and vocabulary")
