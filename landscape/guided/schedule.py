"""Guided dropout schedules (paper eq. 9-10): per-site dropout probabilities from Fisher scores.

Sites (see ``landscape.sites``) are sorted by their element-weighted mean Fisher, ascending; the
least informative site gets the most dropout.  ``apply`` writes each probability where the installed
transformers really reads it at run time: a Dropout module's ``.p`` (which BERT/GPT-2/DistilBERT
attention passes to eager and SDPA attention alike), or the float that T5 and Llama-style attention
modules store (``dropout`` / ``attention_dropout``).

Schedule file (contract): JSON with the model, the Fisher file it came from, and one entry per
dropout site: module name, site score, rank, dropout probability.
"""

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field

from torch import nn

from ..checks import dropout_bounds
from ..errors import UsageError
from ..files import PathLike, atomic_output, json_text, require_readable_file
from ..schema import Schema
from .sites import find_sites, float_dropout_attr, site_scores

__all__ = ["FORMAT", "SHAPES", "SiteProbability", "Schedule", "linear_probabilities", "power_probabilities",
           "log_probabilities", "guided_dropout", "uniform", "apply", "current_probabilities", "to_dict",
           "save_schedule", "load_schedule", "format_table", "matched_uniform",
           "shuffled", "mean_p", "assignment_hash"]

FORMAT = "landscape-schedule/1"
SHAPES = ("linear", "log", "power")


@dataclass
class SiteProbability:
    """One site of a schedule: ``p`` is its dropout probability, ``rank`` 0 = lowest score."""

    name: str
    kind: str
    block: str
    score: float
    rank: int
    p: float


@dataclass
class Schedule:
    """A dropout probability per site, with where it came from."""

    sites: list
    model: str = ""
    fisher: str = ""
    shape: str = "linear"
    p_upper: float = 0.1
    p_lower: float = 0.0
    unscored: list = field(default_factory=list)  # sites of the model the Fisher has no entries for
    model_fingerprint: str = ""  # identity.model_fingerprint of the model it was made for ("" = unknown)

    def probabilities(self):
        """{site module name: dropout probability}."""
        return {s.name: s.p for s in self.sites}


def linear_probabilities(n_sites, p_upper=0.1, p_lower=0.0):
    """Paper eq. 9-10: p_r = p_upper - r * (p_upper - p_lower) / (n - 1) for rank r = 0..n-1.

    Rank 0 (lowest Fisher score) gets p_upper, rank n-1 gets p_lower; one site alone gets p_upper.

    Args:
        n_sites: the number n of sites.
        p_upper: the probability of rank 0.
        p_lower: the probability of rank n-1.

    Returns:
        A list of n probabilities, by rank.

    Raises:
        UsageError: a bound outside [0, 1), or ``p_lower`` above ``p_upper`` (``checks.dropout_bounds``).
    """
    p_upper, p_lower = dropout_bounds(p_upper, p_lower)
    if n_sites == 1:
        return [p_upper]
    step = (p_upper - p_lower) / (n_sites - 1)
    return [p_upper - r * step for r in range(n_sites)]


def power_probabilities(n_sites, p_upper=0.1, p_lower=0.0, gamma=2.0):
    """p_r = p_upper - (p_upper - p_lower) * (r / (n - 1)) ** gamma; gamma = 1 is the linear shape.

    gamma > 1 keeps most sites near p_upper and drops only the most informative ones towards p_lower.

    Args:
        n_sites: the number n of sites.
        p_upper: the probability of rank 0.
        p_lower: the probability of rank n-1.
        gamma: the exponent.

    Returns:
        A list of n probabilities, by rank.

    Raises:
        UsageError: a bound outside [0, 1), or ``p_lower`` above ``p_upper`` (``checks.dropout_bounds``).
    """
    p_upper, p_lower = dropout_bounds(p_upper, p_lower)
    if n_sites == 1:
        return [p_upper]
    return [p_upper - (p_upper - p_lower) * (r / (n_sites - 1)) ** gamma for r in range(n_sites)]


def log_probabilities(sorted_scores, p_upper=0.1, p_lower=0.0):
    """Probabilities ``p = p_upper - (p_upper - p_lower) * u``, u = normalized log score in [0, 1].

    u = (log s - log s_min) / (log s_max - log s_min): probabilities follow the Fisher scores' spread
    (orders of magnitude), not just their order.  Scores <= 0 are clamped to the smallest positive
    score; all-equal scores give every site p_upper.  Bounds outside [0, 1), or ``p_lower`` above
    ``p_upper``, are refused (UsageError, ``checks.dropout_bounds``).
    """
    p_upper, p_lower = dropout_bounds(p_upper, p_lower)
    positive = [s for s in sorted_scores if s > 0]
    floor = min(positive) if positive else 1.0
    logs = [math.log(max(s, floor)) for s in sorted_scores]
    span = logs[-1] - logs[0]
    if span <= 0:
        return [p_upper] * len(sorted_scores)
    return [p_upper - (p_upper - p_lower) * (v - logs[0]) / span for v in logs]


def _probabilities(shape, scores, p_upper, p_lower, gamma):
    if shape == "linear":
        return linear_probabilities(len(scores), p_upper, p_lower)
    if shape == "power":
        return power_probabilities(len(scores), p_upper, p_lower, gamma)
    if shape == "log":
        return log_probabilities(scores, p_upper, p_lower)
    raise UsageError(f"unknown schedule shape '{shape}'; use one of {', '.join(SHAPES)}")


def guided_dropout(model, fisher, p_upper=0.1, p_lower=0.0, shape="linear", gamma=2.0,
                   model_source="", fisher_source="", model_fingerprint="") -> Schedule:
    """Guided dropout schedule for ``model`` from a diagonal Fisher {param name: tensor}.

    Sites are scored by element-weighted mean Fisher and sorted ascending (ties keep module order);
    ``shape`` maps ranks/scores to probabilities in [p_lower, p_upper].  Sites whose parameters are
    all absent from the Fisher (e.g. a fresh classification head) are listed in ``unscored`` and
    left out.

    Args:
        model: the model whose dropout sites are scheduled.
        fisher: {param name: tensor shaped like the param}, the diagonal Fisher.
        p_upper: the probability of the lowest-scored site.
        p_lower: the probability of the highest-scored site.
        shape: 'linear' (paper eq. 9-10), 'power' or 'log' (see ``*_probabilities``).
        gamma: the exponent of the 'power' shape.
        model_source: the model as named by the user, recorded in the schedule.
        fisher_source: the Fisher file, recorded in the schedule.
        model_fingerprint: the model's ``identity.model_fingerprint``, recorded in the schedule.

    Returns:
        A ``Schedule``: one ``SiteProbability`` per scored site, in rank order.

    Raises:
        UsageError: a site with only some of its parameters in the Fisher, or settings out of
            their domains.
    """
    dropout_bounds(p_upper, p_lower)
    if shape not in SHAPES:
        raise UsageError(f"unknown schedule shape '{shape}'; use one of {', '.join(SHAPES)}")
    all_sites = find_sites(model)
    scored = [s for s in all_sites if any(n in fisher for n in s.param_names)]
    if not scored:
        raise UsageError("the Fisher has no entries for any dropout site of this model; "
                         "was it computed for another model?")
    scores = site_scores(scored, fisher)
    order = sorted(scored, key=lambda s: scores[s.name])  # sorted() is stable: ties keep module order
    probs = _probabilities(shape, [scores[s.name] for s in order], p_upper, p_lower, gamma)
    entries = [SiteProbability(name=s.name, kind=s.kind, block=s.block, score=scores[s.name], rank=r, p=float(p))
               for r, (s, p) in enumerate(zip(order, probs))]
    return Schedule(sites=entries, model=model_source, fisher=fisher_source, shape=shape,
                    p_upper=p_upper, p_lower=p_lower,
                    unscored=[s.name for s in all_sites if s not in scored], model_fingerprint=model_fingerprint)


def uniform(model: nn.Module, p: float) -> Schedule:
    """Every dropout site of ``model`` at probability ``p`` (standard dropout; p = 0 turns it off).

    Args:
        model: the model.
        p: the dropout probability, in [0, 1).

    Returns:
        A ``Schedule`` of every site.
    """
    dropout_bounds(p, 0.0)
    entries = [SiteProbability(name=s.name, kind=s.kind, block=s.block, score=float("nan"), rank=i, p=float(p))
               for i, s in enumerate(find_sites(model))]
    return Schedule(sites=entries, shape="uniform", p_upper=p, p_lower=p)


def _as_probabilities(schedule):
    if isinstance(schedule, Schedule):
        return schedule.probabilities()
    if isinstance(schedule, dict):
        return {str(k): float(v) for k, v in schedule.items()}
    return {s.name: float(s.p) for s in schedule}


def apply(model: nn.Module, schedule: Schedule) -> nn.Module:
    """Set each scheduled site's dropout probability on ``model``, in place; returns the model.

    Names are matched to ``model.named_modules()``.  Sites not in the schedule keep their
    probability.  Takes effect for eager and SDPA attention alike (both read the value set here).

    On a PEFT ``PeftModel``, names of adapted base modules (a LoRA schedule, ``guided.lora``) set
    that module's ``lora_dropout``; other names may be the PeftModel's or its base model's.

    Args:
        model: the model.
        schedule: a Schedule, a list of SiteProbability, or {module name: p}.

    Returns:
        The model.

    Raises:
        UsageError: a name the model does not have, or a module that is not a dropout site
            (before anything changes).
    """
    from . import lora_sites as lora

    lora_probs, probs = lora.split_probabilities(model, _as_probabilities(schedule))
    modules = dict(model.named_modules())
    if lora.is_peft_model(model):
        modules.update(model.get_base_model().named_modules())
    missing = [n for n in probs if n not in modules]
    if missing:
        raise UsageError(
            f"the schedule names {len(missing)} dropout site(s) this model does not have (first: "
            f"'{missing[0]}'); was it made for another model? Make the schedule for this model")
    for name, p in probs.items():  # validate everything first: a refused schedule changes nothing
        if not (0.0 <= p < 1.0):
            raise UsageError(f"dropout probability {p} for site '{name}' is outside [0, 1)")
        if not isinstance(modules[name], nn.Dropout) and float_dropout_attr(modules[name]) is None:
            raise UsageError(f"module '{name}' ({type(modules[name]).__name__}) is not a dropout site")
    lora.set_probabilities(model, lora_probs)  # validates its own p's before changing any
    for name, p in probs.items():
        module = modules[name]
        if isinstance(module, nn.Dropout):
            module.p = float(p)
        else:
            setattr(module, float_dropout_attr(module), float(p))
    return model


def current_probabilities(model: nn.Module) -> dict:
    """{site name: the dropout probability the model uses now}, read back from the modules."""
    modules = dict(model.named_modules())
    out = {}
    for site in find_sites(model):
        module = modules[site.name]
        out[site.name] = module.p if isinstance(module, nn.Dropout) else getattr(module, float_dropout_attr(module))
    return out


def to_dict(schedule: Schedule):
    """The JSON-ready form of a schedule (the file contract)."""
    return {"format": FORMAT, "model": schedule.model, "fisher": schedule.fisher, "shape": schedule.shape,
            "p_upper": schedule.p_upper, "p_lower": schedule.p_lower,
            "sites": [asdict(s) for s in schedule.sites], "unscored": list(schedule.unscored),
            "model_fingerprint": schedule.model_fingerprint}


def save_schedule(schedule: Schedule, path):
    """Write a schedule as JSON, atomically (no partial file on failure).

    Args:
        schedule: the ``Schedule``.
        path: the JSON file to write.
    """
    with atomic_output(path) as tmp:
        # Strict JSON: a score that is not a number (a uniform schedule has none) is written as null.
        tmp.write_text(json_text(to_dict(schedule), indent=2) + "\n")
    return path


def _float_or_nan(value):
    return float("nan") if value is None else float(value)


def load_schedule(path: PathLike) -> Schedule:
    """Read a schedule JSON written by ``save_schedule``.

    Schema (``check_schedule``): a 'sites' list of objects, each with a string 'name', a
    probability 'p' in [0, 1), a finite 'score' or null, an integer 'rank' >= 0 when given.

    Args:
        path: the schedule file (.json).

    Returns:
        The ``Schedule``.

    Raises:
        UsageError: a missing or unreadable file, or one that is not a schedule.
    """
    path = require_readable_file(path, "schedule file")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"'{path}' is not a schedule file (JSON with a 'sites' list of name/p entries): "
                         f"{type(err).__name__}: {err}") from None
    check_schedule(data, path)
    sites = [SiteProbability(name=e["name"], kind=str(e.get("kind", "")), block=str(e.get("block", "")),
                             score=_float_or_nan(e.get("score")), rank=int(e.get("rank", i)), p=float(e["p"]))
             for i, e in enumerate(data["sites"])]
    return Schedule(sites=sites, model=str(data.get("model", "")), fisher=str(data.get("fisher", "")),
                    shape=str(data.get("shape", "")), p_upper=_float_or_nan(data.get("p_upper")),
                    p_lower=_float_or_nan(data.get("p_lower")), unscored=list(data.get("unscored", [])),
                    model_fingerprint=str(data.get("model_fingerprint") or ""))


def check_schedule(data, path) -> None:
    """DamagedFile at the first part of a schedule file's JSON that breaks its schema."""
    schema = Schema("schedule file", path, "make it again with `landscape schedule`")
    schema.mapping(data)
    if "format" in data and data["format"] != FORMAT:
        schema.fail(f"is not a schedule file (format {data['format']!r}, not {FORMAT!r})")
    sites = schema.field(data, "sites")
    if not isinstance(sites, list) or not sites:
        schema.fail("is damaged: 'sites' is not a list of sites")
    for i, entry in enumerate(sites):
        where = f"sites[{i}]"
        schema.mapping(entry, where)
        schema.text(schema.field(entry, "name", where), f"{where}.name")
        p = schema.number(schema.field(entry, "p", where), f"{where}.p", minimum=0.0)
        if p >= 1:
            schema.fail(f"is damaged: '{where}.p' is {p:g}, not below 1")
        if entry.get("score") is not None:
            schema.number(entry["score"], f"{where}.score")
        if "rank" in entry:
            schema.integer(entry["rank"], f"{where}.rank", minimum=0)


def format_table(schedule: Schedule):
    """The schedule as an aligned text table, one site per line, in rank order."""
    width = max([len(s.name) for s in schedule.sites] + [4])
    lines = [f"{'rank':>4}  {'site':<{width}}  {'kind':<10}  {'score':>11}  {'p':>6}"]
    for s in sorted(schedule.sites, key=lambda s: s.rank):
        lines.append(f"{s.rank:>4}  {s.name:<{width}}  {s.kind:<10}  {s.score:>11.4e}  {s.p:>6.4f}")
    return "\n".join(lines)


# ================================================================================================
# Controls for guided dropout: schedules with the guided schedule's dropout budget but without its
# Fisher-guided placement.  The Schedule has no free metadata field, so what a control was derived
# from is recorded in ``shape`` (written to and read from the schedule file); ``model``, ``fisher``
# and ``unscored`` are carried over from the source schedule.


def _source_description(schedule):
    return f"{schedule.shape or 'unknown'}, p_upper={schedule.p_upper:g}, p_lower={schedule.p_lower:g}"


def _sites_of(schedule):
    if not isinstance(schedule, Schedule) or not schedule.sites:
        raise UsageError("a control needs a guided dropout schedule with at least one site")
    return schedule.sites


def matched_uniform(schedule: Schedule) -> Schedule:
    """Uniform dropout at the schedule's mean probability, on the same sites.

    The mean is over sites, each site counting once (not weighted by its element count): the
    quantity eq. 9-10 spread over the ranks, so a linear schedule from p_upper to p_lower matches
    (p_upper + p_lower) / 2.  Sites keep their name, kind, block, score and rank, so the file still
    says which site was which; every p is the mean.  ``shape`` records the source, e.g.
    ``"matched-uniform(linear, p_upper=0.1, p_lower=0)"``.  Sites outside the schedule (a new head)
    are untouched by ``apply``, as for the source schedule.

    Raises:
        UsageError: not a Schedule, or one without sites.
    """
    sites = _sites_of(schedule)
    mean = math.fsum(s.p for s in sites) / len(sites)
    entries = [SiteProbability(name=s.name, kind=s.kind, block=s.block, score=s.score, rank=s.rank, p=mean)
               for s in sites]
    return Schedule(sites=entries, model=schedule.model, fisher=schedule.fisher,
                    shape=f"matched-uniform({_source_description(schedule)})", p_upper=mean, p_lower=mean,
                    unscored=list(schedule.unscored), model_fingerprint=schedule.model_fingerprint)


def shuffled(schedule: Schedule, seed: int) -> Schedule:
    """The schedule's probabilities assigned to its sites in a seeded random order.

    The same multiset of probabilities on the same sites, permuted by ``random.Random(seed)``:
    deterministic for a seed, a different order for (almost every) other seed.  Each site keeps its
    own name, kind, block, score and rank, so rank no longer predicts p: that is the control.
    ``shape`` records the source and seed, e.g. ``"shuffled(seed=3; linear, p_upper=0.1,
    p_lower=0)"``; p_upper and p_lower are the source's.

    Raises:
        UsageError: not a Schedule, one without sites, or a seed that is not an integer.
    """
    sites = _sites_of(schedule)
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise UsageError(f"the shuffle seed must be an integer, got {seed!r}")
    seed = seed.__index__()  # numpy integers too; the recorded seed is a plain int
    order = list(range(len(sites)))
    random.Random(seed).shuffle(order)
    entries = [SiteProbability(name=s.name, kind=s.kind, block=s.block, score=s.score, rank=s.rank,
                               p=sites[order[i]].p)
               for i, s in enumerate(sites)]
    return Schedule(sites=entries, model=schedule.model, fisher=schedule.fisher,
                    shape=f"shuffled(seed={seed}; {_source_description(schedule)})",
                    p_upper=schedule.p_upper, p_lower=schedule.p_lower, unscored=list(schedule.unscored),
                    model_fingerprint=schedule.model_fingerprint)


def mean_p(schedule: Schedule) -> float:
    """Mean dropout probability over the schedule's sites, each site counting once."""
    sites = _sites_of(schedule)
    return math.fsum(s.p for s in sites) / len(sites)


def assignment_hash(schedule: Schedule, length: int = 10) -> str:
    """Short hex digest of the schedule's site -> p assignment (sorted by site name, p as repr).

    Two schedules get the same hash exactly when they give every site the same probability, so a
    per-run record can say which permutation a shuffled control used and whether a rerun used the
    same guided schedule.
    """
    pairs = sorted((s.name, repr(float(s.p))) for s in _sites_of(schedule))
    return hashlib.sha256(json_text(pairs).encode()).hexdigest()[:length]
