"""The schedule stage as one call.

``run_schedule`` writes a guided dropout schedule (JSON) from a
Fisher file and its model; ``landscape schedule``, the demo and Python users call it.

Kept apart from ``guided.schedule`` (the schedules themselves, their file and controls), which
this stage only drives.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UsageError
from ..files import PathLike, check_distinct_paths, check_output_path
from ..inputs import check_file_for_model, check_inputs, stage_model, stage_runtime
from ..models import LoadedModel
from ..outputs import claim_output
from ..results import StageResult
from ..settings import ScheduleSettings
from .schedule import Schedule, guided_dropout, load_schedule, save_schedule


@dataclass
class ScheduleResult(StageResult):
    """What ``run_schedule`` wrote: ``schedule``, the ``Schedule`` (``computed`` and ``total``: its sites)."""

    schedule: Schedule


def run_schedule(settings: ScheduleSettings, *, out: PathLike, model: Optional[LoadedModel] = None,
                 overwrite: bool = False) -> ScheduleResult:
    """Score every dropout site of a model by its Fisher and write the guided dropout schedule.

    Sites are sorted by the element-weighted mean Fisher of the parameters they drop, ascending;
    the lowest-scored site gets ``p_upper``, the highest ``p_lower`` (paper eq. 9-10 for ``shape``
    "linear").  The model only gives shapes and sites, so a checkpoint without its pretraining head
    is accepted.

    Args:
        settings: the Fisher file, the model it was computed on and the schedule's shape
            (``ScheduleSettings(fisher=...)``; ``lora``: a guided LoRA dropout schedule instead,
            ``guided.lora``, needs peft: "" takes the LoRA modules of a PEFT adapter model, a spec
            such as "targets=q_proj,v_proj" wraps the base model with them).
        out: the schedule JSON to write.
        model: a ``models.LoadedModel`` already in memory (None: load ``settings.model``); its
            fingerprint is still checked against the Fisher file's.
        overwrite: replace an ``out`` that is not a dropout schedule.

    Returns:
        a ScheduleResult; ``schedule.format_table(result.schedule)`` prints it, and
        ``result.schedule.unscored`` lists sites without Fisher entries, left unchanged.

    Raises:
        UsageError: a Fisher file of another model, a loaded model the settings do not describe;
            ``OutputRefused`` for an ``out`` holding another kind of file unless ``overwrite``.
    """
    from ..fisher import load_fisher
    from ..identity import MODEL_KEY, model_fingerprint

    out = check_output_path(out, "out", [".json"])
    fisher_path = settings.fisher
    lora = settings.lora is not None
    check_distinct_paths({"out": out}, {"fisher": fisher_path, "model": settings.model.source})
    # A LoRA schedule scores the modules its adapter adapts by their base weights: the base's Fisher serves.
    check_inputs(settings.model, model, [(fisher_path, "fisher")], adapter_base=lora)
    with claim_output(out, "schedule", overwrite=overwrite), stage_runtime(settings.model):
        fisher, meta = load_fisher(fisher_path)
        loaded = stage_model(settings.model.replace(allow_new_head=True), model)
        weights = model_fingerprint(loaded)
        if meta.get(MODEL_KEY):
            check_file_for_model(fisher_path, "Fisher file", meta[MODEL_KEY], loaded, adapter_base=lora)
        make, target = guided_dropout, loaded.model
        if lora:
            from . import lora as lora_module

            make, target = lora_module.lora_schedule, _lora_model(loaded, settings.lora)
        schedule = make(target, fisher, p_upper=settings.p_upper, p_lower=settings.p_lower, shape=settings.shape,
                        gamma=settings.gamma, model_source=loaded.source, fisher_source=str(fisher_path),
                        model_fingerprint=weights)
        save_schedule(schedule, Path(out))
    return ScheduleResult(path=out, settings=settings, computed=len(schedule.sites), total=len(schedule.sites),
                          fingerprints={"model_fingerprint": weights}, schedule=schedule)


def _lora_model(loaded, spec: str):
    """The PeftModel whose LoRA modules are the sites: the adapter itself, or the base wrapped with LoRA of ``spec``."""
    from . import lora

    lora.require_peft("a LoRA schedule")
    if lora.is_peft_model(loaded.model):
        if spec:
            raise UsageError("the model is a PEFT adapter: its LoRA modules are the sites; give no LoRA spec")
        return loaded.model
    task = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classification": "SEQ_CLS"}.get(loaded.kind)
    return lora.wrap(loaded.model, lora.parse_lora_spec(spec), task)


def schedule_from_args(model, schedule_path: Optional[str] = None, fisher_path: Optional[str] = None,
                       p_upper=0.1, p_lower=0.0, shape="linear", model_fingerprint: str = "", model_spec=None):
    """Load a schedule file, or compute one from a Fisher file; None when neither is given.

    On a PEFT LoRA model the computed schedule is the guided LoRA dropout one
    (``lora.lora_schedule``).  Files without a recorded fingerprint are checked by site names only.

    Args:
        model: the model the schedule is for.
        schedule_path: a schedule file (.json), or None.
        fisher_path: a Fisher file to compute a schedule from (``guided_dropout``), or None.
        p_upper: the highest probability of a computed schedule.
        p_lower: the lowest probability of a computed schedule.
        shape: the shape of a computed schedule (see ``guided_dropout``).
        model_fingerprint: the ``identity.model_fingerprint`` of the checkpoint ``model`` was
            built from; when given, a schedule or Fisher file recorded for another model is
            refused.
        model_spec: how the user named the model (``--model``), for messages.

    Returns:
        The ``Schedule``, or None when neither file is given.

    Raises:
        UsageError: an unreadable file, or one recorded for another model.
    """
    from ..identity import check_file_model

    if schedule_path:
        loaded = load_schedule(schedule_path)
        if model_fingerprint:
            check_file_model(schedule_path, "schedule", loaded.model_fingerprint, model_fingerprint, model_spec)
        return loaded
    if fisher_path:
        from ..fisher import check_fisher_model, load_fisher
        from . import lora

        fisher, meta = load_fisher(fisher_path)
        if model_fingerprint:
            check_fisher_model(fisher_path, meta, model_fingerprint, model_spec)
        make = lora.lora_schedule if lora.lora_modules(model) else guided_dropout
        return make(model, fisher, p_upper=p_upper, p_lower=p_lower, shape=shape, fisher_source=str(fisher_path),
                    model_fingerprint=model_fingerprint)
    return None
