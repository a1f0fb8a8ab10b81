"""One fine-tuning run of a pretrained LM for sequence classification/regression, under a regularizer.

The paper's recipe is the default for a given model (AdamW, lr 2e-5, betas 0.9/0.999, linear warm-up
over the first 10% of steps then linear decay, 3 epochs, batch size 8).  Sweeps over fractions and
restarts are in ``guided.sweep``.

Restarts: the train/test split is fixed (``split_seed``); a restart seed picks the training
sub-sample (nested across fractions), the new head's initialisation, the batch order and the
dropout masks, and (``guided-shuffled``) the permutation of the guided schedule's probabilities.

Regularizers: ``none``, ``dropout`` (every site at ``config.dropout``), ``gaussian``, ``guided``
(the Fisher-guided schedule), its two controls ``dropout-matched`` (uniform at the schedule's mean
p) and ``guided-shuffled`` (the schedule's probabilities on a seeded permutation of its sites),
``r3f``, ``r4f``, ``mixout`` (Lee et al. 2020) and ``childtuning`` (ChildTuning-D, Xu et al. 2021).
"""

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError

from .. import checks
from ..data.labelled import LabelledData, encode, labelled_batch
from ..data.objectives import pad_token_id
from ..datahome import EMBEDDED_MODEL_DIR
from ..errors import UsageError
from ..models import check_finite_weights, check_weight_files, load_tokenizer, new_parameters
from ..runtime import transformers_silenced
from ..settings import REGULARIZERS
from . import lora
from . import regularizers as regs
from . import schedule as sched
from .metrics import compute_metrics

# Regularizers built from the guided schedule (so from a pretraining Fisher); the others need none.
SCHEDULE_REGULARIZERS = ("guided", "dropout-matched", "guided-shuffled")
# Regularizers that act only through the model's dropout sites: on a model without any they train
# exactly like "none" (mixout, childtuning and r3f/r4f still act).
DROPOUT_ONLY_REGULARIZERS = ("dropout", "gaussian") + SCHEDULE_REGULARIZERS


def check_regularizers(names, guided: "Optional[sched.Schedule]" = None) -> list:
    """Check the regularizers of a run.

    Args:
        names: regularizer names (keys of ``REGULARIZERS``).
        guided: the guided dropout schedule, needed by those built from it (guided,
            dropout-matched, guided-shuffled).

    Returns:
        The names, as a list.

    Raises:
        UsageError: no name, an unknown name, or a schedule needed but not given.
    """
    unknown = [r for r in names if r not in REGULARIZERS]
    if unknown or not names:
        raise UsageError(f"unknown regularizer '{(unknown or [''])[0]}'; use any of {', '.join(REGULARIZERS)}")
    needs = [r for r in names if r in SCHEDULE_REGULARIZERS]
    if needs and guided is None:
        raise UsageError(f"the {needs[0]} regularizer needs a guided dropout schedule (a schedule file, or a "
                         "Fisher file to compute one from)")
    return list(names)


def run_schedule(name, guided, seed=0) -> "Optional[sched.Schedule]":
    """The dropout schedule regularizer ``name`` trains with for restart ``seed``; None if it has none.

    For 'guided': the guided schedule itself; dropout-matched: ``schedule.matched_uniform(guided)``
    (every site of the schedule at its mean p); guided-shuffled: ``schedule.shuffled(guided, seed)``
    (its probabilities permuted over its sites; the permutation seed is the restart seed, so every
    restart gets a new permutation).

    Args:
        name: the regularizer.
        guided: the guided schedule.
        seed: the restart seed.
    """
    if name not in SCHEDULE_REGULARIZERS:
        return None
    check_regularizers([name], guided)
    if name == "dropout-matched":
        return sched.matched_uniform(guided)
    if name == "guided-shuffled":
        return sched.shuffled(guided, seed)
    return guided


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (defaults: the paper's recipe)."""

    lr: float = 2e-5
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of all steps spent warming up linearly from 0 to lr
    epochs: int = 3
    batch_size: int = 8
    seq_len: int = 128  # tokens per example (truncated)
    eval_batch_size: int = 64
    dropout: float = 0.1  # standard / Gaussian dropout probability, and the head's under guided dropout
    r3f_lambda: float = 1.0
    r3f_sigma: float = 1e-5
    r3f_noise: str = "normal"
    mixout_p: float = 0.9  # mixout's mixing probability (the reference's GLUE setting)
    childtuning_reserve: float = 0.3  # ChildTuning-D: share of the body's elements that train
    device: str = "cpu"
    lora: Optional[str] = None  # LoRA instead of full fine-tuning: 'r=8,alpha=16,targets=q_proj,v_proj'

    def __post_init__(self):
        # Checked here, so a bad value is refused before a run rather than surfacing as NaN weights.
        for name, domain in _CONFIG_DOMAINS.items():
            setattr(self, name, domain.check(getattr(self, name), name))
        if self.r3f_noise not in ("normal", "uniform"):
            raise UsageError(f"r3f_noise must be normal or uniform, got {self.r3f_noise!r}")


_CONFIG_DOMAINS = {"lr": checks.POSITIVE, "weight_decay": checks.NON_NEGATIVE, "warmup": checks.PROBABILITY,
                   "epochs": checks.EPOCHS, "batch_size": checks.POSITIVE_INT, "seq_len": checks.SEQ_LEN,
                   "eval_batch_size": checks.POSITIVE_INT, "dropout": checks.BELOW_ONE,
                   "r3f_lambda": checks.NON_NEGATIVE, "r3f_sigma": checks.POSITIVE, "mixout_p": checks.BELOW_ONE,
                   "childtuning_reserve": checks.FRACTION}


# ---------------------------------------------------------------- model and batches

def load_classifier(spec: Optional[str], data: LabelledData, device="cpu"):
    """(model, tokenizer) with a fresh sequence-classification/regression head, on ``device``.

    Args:
        spec: the pretrained model (hub id or folder), or None for the embedded one.
        data: the ``LabelledData`` whose task and labels size the head.
        device: where the model goes.
    """
    from transformers import AutoModelForSequenceClassification

    source = str(EMBEDDED_MODEL_DIR) if spec is None else str(spec)
    num_labels = 1 if data.task == "regression" else len(data.label_names)
    problem = "regression" if data.task == "regression" else "single_label_classification"
    check_weight_files(source)
    try:
        # The "newly initialized head" report is expected here: the head is new by design.
        with transformers_silenced():
            tokenizer = load_tokenizer(source)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, problem_type=problem, output_loading_info=True)
    except (OSError, ValueError, SafetensorError) as err:
        reason = str(err).splitlines()[0]
        raise UsageError(f"cannot load model '{source}' for sequence classification: {reason}") from None
    check_finite_weights(model, source)
    # What the checkpoint lacked (the head, a BERT pooler): LoRA must train and save these too.
    model.landscape_new_parameters = new_parameters(info)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id(tokenizer)
    if data.task == "classification":
        model.config.id2label = dict(enumerate(data.label_names))
        model.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    return model.to(device), tokenizer


# ---------------------------------------------------------------- one run

def prepare_regularizer(model, name, config, guided=None, *, seed=0, train_batches=None):
    """Set ``model`` up for regularizer ``name``, in place; returns the loss function to train with.

    Every regularizer starts from standard dropout ``config.dropout`` at all sites ("none" from 0);
    "guided", "dropout-matched" and "guided-shuffled" then override the sites of their schedule
    (``run_schedule(name, guided, seed)``; sites it does not cover, like a new classification head,
    keep ``config.dropout``); "gaussian" turns all sites into Gaussian dropout; "r3f" adds the R3F
    penalty, "r4f" also spectral-normalizes the head; "mixout" mixes every linear layer of the body
    with its weights at this call (the pretrained ones) at ``config.mixout_p`` and sets dropout to 0,
    as the reference does; "childtuning" computes the task Fisher once on ``train_batches`` (the
    run's training data, labelled batches) and from then on trains only the
    ``config.childtuning_reserve`` share of the body with the highest Fisher, plus the head.
    ``undo_regularizer`` makes the model plain again.  With ``config.lora`` (``model`` a PeftModel)
    the regularizer acts on LoRA's ``lora_dropout`` only (``lora.prepare``; the base model's own
    dropout keeps its configured values), and only those of ``lora.LORA_REGULARIZERS`` are taken.

    Args:
        model: the classifier to fine-tune.
        name: a key of ``REGULARIZERS``.
        config: the ``FinetuneConfig``.
        guided: the guided schedule, for the regularizers built from it.
        seed: the restart seed.
        train_batches: the run's labelled training batches (for "childtuning").

    Returns:
        The loss function, called as ``loss_fn(model, batch)``.
    """
    check_regularizers([name], guided)
    if config.lora:
        lora.prepare(model, name, config.dropout, run_schedule(name, guided, seed))
        return lambda m, b: m(**b).loss
    sched.apply(model, sched.uniform(model, 0.0 if name == "none" else config.dropout))
    if name in SCHEDULE_REGULARIZERS:
        sched.apply(model, run_schedule(name, guided, seed))
    elif name == "gaussian":
        regs.use_gaussian_dropout(model)
    elif name == "r4f":
        regs.add_spectral_norm(model)
    elif name == "mixout":
        regs.use_mixout(model, p=config.mixout_p)
    elif name == "childtuning":
        if train_batches is None:
            raise UsageError("the childtuning regularizer needs the training batches to compute the task Fisher")
        regs.use_childtuning(model, regs.childtuning_mask(model, train_batches, config.childtuning_reserve))
    if name in ("r3f", "r4f"):
        return lambda m, b: regs.r3f_loss(m, b, lam=config.r3f_lambda, sigma=config.r3f_sigma,
                                          noise=config.r3f_noise)[0]
    return lambda m, b: m(**b).loss


def undo_regularizer(model):
    """Make a trained model plain again for evaluation and saving; returns it.

    No ChildTuning gradient hooks, no mixout (its parametrization removed with the trained weights
    kept, the dropout probabilities from before it restored), standard attention, R4F's spectral
    norm folded into plain weights.

    Mixout goes before the spectral norm: ``remove_spectral_norm`` only touches spectral-norm
    parametrizations, so the order is not load-bearing, but mixout's removal also restores dropout.
    """
    regs.remove_childtuning(model)
    regs.remove_mixout(model)
    regs.restore_attention(model)
    regs.remove_spectral_norm(model)
    return model


def _linear_warmup_decay(optimizer, total_steps, warmup_fraction):
    warmup = max(1, math.ceil(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model, loss_fn, encoded, data, config, seed, progress=None):
    """AdamW with warm-up then linear decay for ``config.epochs`` epochs.

    Args:
        model: the model, set up by ``prepare_regularizer``.
        loss_fn: the loss function ``prepare_regularizer`` returned.
        encoded: the training rows, as ``labelled.encode`` returns them.
        data: the training ``LabelledData`` (labels, task).
        config: the ``FinetuneConfig``.
        seed: seeds the batch order.
        progress: a tqdm bar to advance by steps, or None.

    Returns:
        The last training loss, a float.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    lr_schedule = _linear_warmup_decay(optimizer, steps_per_epoch * config.epochs, config.warmup)
    order_rng = random.Random(seed)
    pad_id = model.config.pad_token_id
    model.train()
    loss = float("nan")
    for _ in range(config.epochs):
        order = list(range(len(data)))
        order_rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = labelled_batch(encoded, data.labels, order[start:start + config.batch_size], pad_id,
                                   data.task, device)
            value = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            lr_schedule.step()
            loss = value.item()
            if progress is not None:
                progress.update(1)
    model.eval()
    return loss


@torch.no_grad()
def evaluate_classifier(model, encoded, data, batch_size=64):
    """Task metrics of ``model`` on ``data`` (eval mode, no dropout).

    Args:
        model: the fine-tuned classifier.
        encoded: the rows, as ``labelled.encode`` returns them.
        data: the ``LabelledData`` (labels, task).
        batch_size: rows per forward pass.

    Returns:
        {metric: float} (see ``metrics.compute_metrics``).
    """
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = labelled_batch(encoded, data.labels, idx, model.config.pad_token_id, data.task, device)
        batch.pop("labels")
        logits = model(**batch).logits.float()
        outputs.append(logits.squeeze(-1) if data.task == "regression" else logits.argmax(-1))
    predictions = torch.cat(outputs).cpu().numpy()
    return compute_metrics(data.task, data.labels, predictions, max(2, len(data.label_names)))


def finetune_once(model_spec, train_data, test_data, regularizer, seed=0, config=None, guided=None,
                  save_dir=None, progress=None):
    """One fine-tuning run; returns {metric: value} on ``test_data`` (and saves the model if asked).

    Args:
        model_spec: the pretrained model (hub id or folder) to fine-tune.
        train_data: the training ``LabelledData``.
        test_data: the test ``LabelledData``.
        regularizer: a key of ``REGULARIZERS``.
        seed: the restart seed (seeds the run's random choices).
        config: a ``FinetuneConfig`` (None: the defaults).
        guided: the guided schedule, for the regularizers built from it (``SCHEDULE_REGULARIZERS``).
        save_dir: write a ``from_pretrained`` folder (model + tokenizer) there; it loads with
            ``AutoModelForSequenceClassification.from_pretrained``.  With ``config.lora`` it is a
            PEFT adapter folder (the LoRA weights and the new head; ``PeftModel.from_pretrained`` or
            ``landscape ... --model DIR``).
        progress: a tqdm bar to advance by training steps, or None.

    Returns:
        {metric: value} on ``test_data``.
    """
    config = config or FinetuneConfig()
    torch.manual_seed(seed)  # the head's initialisation and the dropout masks follow the restart seed
    model, tokenizer = load_classifier(model_spec, train_data, config.device)
    if config.lora:
        model = lora.wrap_classifier(model, config.lora)
    train_enc = encode(tokenizer, train_data, config.seq_len)
    test_enc = encode(tokenizer, test_data, config.seq_len)
    train_batches = None
    if regularizer == "childtuning":
        pad_id, device = model.config.pad_token_id, next(model.parameters()).device
        train_batches = (labelled_batch(train_enc, train_data.labels,
                                        list(range(i, min(i + config.batch_size, len(train_data)))), pad_id,
                                        train_data.task, device)
                         for i in range(0, len(train_data), config.batch_size))
    loss_fn = prepare_regularizer(model, regularizer, config, guided, seed=seed, train_batches=train_batches)
    final_loss = train(model, loss_fn, train_enc, train_data, config, seed, progress)
    undo_regularizer(model)
    metrics = evaluate_classifier(model, test_enc, test_data, config.eval_batch_size)
    metrics["final_train_loss"] = final_loss
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        with transformers_silenced(errors_only=False):
            model.save_pretrained(save_dir)
            tokenizer.save_pretrained(save_dir)
    return metrics


