"""The settings of the stages, as frozen dataclasses: each default, help text and domain in one place.

A stage takes one settings object (``FisherSettings``, ``SurfaceSettings``, ...) built from the
specs it shares with the others: ``ModelSpec`` (which model, on what, in what precision),
``SampleSpec`` (which packed sequences of which corpus) and ``GridSpec`` (the coefficients of a
surface).  Every field is declared with ``setting()``: its default, its help text, its domain
(``checks.Domain``, a list or a range of them) or its choices, and whether it changes the numbers
(``identity``).  Validation happens once, when the object is made, and refuses in the library's
terms (``UsageError`` naming the field); the command line's parsers are generated from the same
fields (``cli/generated.py``), so an option, its default and its refusal cannot drift from the API.

``to_dict`` / ``from_dict`` round-trip a settings object through plain JSON-able values (the form
the files store), and ``identity()`` gives the fields that change the numbers, flattened, one
spelling per fact.  Standard library only: the parsers need these, and ``landscape --help`` must
not pay for torch.

Size: one class per stage, each field with its help and domain; they stay together so that the
specs and the stages' settings read as one reference (docs/api.md) and share their helpers.
"""

import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from . import checks
from .defaults import FINETUNE_EMBEDDED, FINETUNE_PAPER, STABILITY_FRACTIONS, STABILITY_TOP
from .errors import SettingsRefused, UsageError
from .runtime import PRECISIONS, THREADS_HELP, parse_threads

BOS_CHOICES = ("auto", "yes", "no")
PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def precision_name(text: Any) -> str:
    """A precision's name as settings hold it: lower case, short forms (bf16, ...) spelled out."""
    name = str(text).strip().lower()
    return PRECISION_ALIASES.get(name, name)
DEFAULT_GRID = "-1:1:21"  # the coefficients along an axis that is asked for without a range


def setting(default: Any = MISSING, *, help: str, domain: Any = None, choices: Optional[Sequence] = None,
            flag: Optional[str] = None, aliases: Sequence[str] = (), metavar: Optional[str] = None,
            identity: bool = True, key: Optional[str] = None, unset: Optional[str] = None,
            convert: Any = None, positional: bool = False, bare: Any = MISSING, exclude: Sequence[str] = (),
            factory: Any = None, helps: Optional[Dict[str, str]] = None, nargs: Optional[str] = None,
            rename: Optional[Dict[str, str]] = None) -> Any:
    """A settings field: ``dataclasses.field`` with what the parser and the validation need.

    Args:
        default: the value when the setting is left out (MISSING: required).
        help: one sentence for ``--help`` and the docs; the default is appended by the parser.
        domain: a ``checks.Domain`` (or ``checks.ListDomain`` / ``checks.RangeDomain``) the value
            must lie in; None: no numeric domain.
        choices: the allowed values of a word setting.
        flag: the command-line option (default ``--`` + the name with dashes).
        aliases: older spellings of the option, still accepted.
        metavar: how ``--help`` names the value.
        identity: whether the setting changes the numbers (part of the stage's identity).
        key: the setting's name in identities and files, where it differs from the field's.
        unset: what leaving out an optional setting means, for ``--help`` where its default is None.
        convert: a function applied to a given value before its check (e.g. spelling out aliases).
        positional: the command line takes it as a positional argument rather than an option.
        bare: the value of the option given without one (``--lora`` alone); MISSING: a value is required.
        exclude: for a nested spec, its fields this stage's command line does not offer (they keep
            the spec's defaults, which the stage may override, e.g. a schedule always accepts a new head).
        factory: a callable giving the default (for nested specs).
        helps: for a nested spec, this stage's help of some of its fields, by name, where the
            spec's own would say what the stage does not do (finetune takes no PEFT adapter).
        nargs: how many values the option takes (argparse's, e.g. "+" for a tuple of paths).
        rename: for a nested spec, its fields this stage's command line names otherwise (e.g.
            ``{"seed": "sample_seed"}``: ``--sample-seed``, beside the stage's own ``--seed``).
    """
    metadata = dict(help=help, domain=domain, choices=None if choices is None else tuple(choices), flag=flag,
                    aliases=tuple(aliases), metavar=metavar, identity=identity, key=key, unset=unset,
                    convert=convert, positional=positional, bare=bare, exclude=tuple(exclude), helps=dict(helps or {}),
                    nargs=nargs, rename=dict(rename or {}))
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Settings:
    """What every settings dataclass shares: validation on creation, dict round trip, identity.

    Subclasses are frozen dataclasses whose fields are ``setting()``s; a field whose value is
    itself a ``Settings`` (a spec) is validated by its own class.
    """

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            nested = _spec_class(spec)
            if nested is not None or isinstance(value, Settings):  # a spec in its own field only
                if nested is None or not isinstance(value, nested):
                    wanted = f"a {nested.__name__}" if nested else "a plain value"
                    raise UsageError(f"{spec.name} must be {wanted}, got {type(value).__name__}")
                continue
            checked = _check(spec, value)
            if checked is not value:
                object.__setattr__(self, spec.name, checked)
        self.validate()

    def validate(self) -> None:
        """Checks across fields (a subclass's); the fields are each already in their domains."""

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain values (nested specs as dicts, tuples as lists), for JSON."""
        return {spec.name: _plain(getattr(self, spec.name)) for spec in fields(self)}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]):
        """The settings from ``to_dict``'s form; keys this version does not know are ignored.

        A file written by a newer version may hold settings this one lacks: they are left out
        rather than refused, as PEFT's configs load.  Each value is validated as on creation.
        """
        known = {spec.name: spec for spec in fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name not in known:
                continue
            nested = _spec_class(known[name])
            kwargs[name] = nested.from_dict(value) if nested is not None and isinstance(value, dict) else value
        return cls(**kwargs)

    def identity(self) -> Dict[str, Any]:
        """The settings that change the numbers, flattened (a spec's fields inline), as plain values."""
        out = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Settings):
                out.update(value.identity())
            elif spec.metadata.get("identity", True):
                out[spec.metadata.get("key") or spec.name] = _plain(value)
        return out

    def replace(self, **changes):
        """A copy with ``changes`` (validated again); a nested spec's fields may be given by name."""
        import dataclasses

        own = {spec.name for spec in fields(self)}
        nested = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Settings):
                mine = {k: changes.pop(k) for k in list(changes) if k in {f.name for f in fields(value)} and
                        k not in own}
                if mine:
                    nested[spec.name] = value.replace(**mine)
        unknown = set(changes) - own
        if unknown:
            raise UsageError(f"{type(self).__name__} has no setting {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes, **nested)


def _spec_class(spec) -> Optional[type]:
    """The ``Settings`` class of a nested-spec field, or None for a plain one."""
    if spec.default_factory is not MISSING:
        made = spec.default_factory()
        if isinstance(made, Settings):
            return type(made)
    return None


def _check(spec, value):
    """``value`` converted to the field's domain or choices; UsageError naming the field otherwise."""
    meta = spec.metadata
    if value is None and spec.default is None:
        return value  # an optional setting left out
    if meta.get("convert") is not None:
        value = meta["convert"](value)
    domain, choices = meta.get("domain"), meta.get("choices")
    if domain is not None:
        return domain.check(value, spec.name)
    if choices is not None:
        text = str(value).lower() if isinstance(value, str) else value
        if text not in choices:
            raise UsageError(f"{spec.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return text
    if isinstance(spec.default, bool) and not isinstance(value, bool):
        raise UsageError(f"{spec.name} must be True or False, got {value!r}")
    return value


def _plain(value):
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


def _path_text(value):
    """A path setting as text: an ``os.PathLike`` becomes its string; anything else is left to be checked."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


class _Threads:
    """The thread setting's domain: 'auto' or a count (``runtime.parse_threads``)."""

    def check(self, value, name):
        try:
            text = parse_threads(value)
        except UsageError:
            text = None
        if text is None or (text != "auto" and int(text) > checks.THREADS_MAX):
            raise UsageError(f"{name} must be {self.describe()}, got '{value}'")
        return text

    def describe(self):
        return f"auto or an integer in [0, {checks.THREADS_MAX}]"


THREADS = _Threads()


# ----------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ModelSpec(Settings):
    """Which model a stage runs, on what, and in what precision."""

    source: Optional[str] = setting(
        None, flag="--model", key="model",
        help="Hugging Face model id, local from_pretrained folder, or PEFT adapter folder (base resolved as PEFT "
             "does; needs landscape[lora]) (default: the embedded model)")
    dtype: str = setting("float32", choices=PRECISIONS, convert=precision_name,
                         help="precision of the weights and the computation (tf32: float32 weights, TF32 matmuls)")
    device: str = setting("auto", identity=False, help="auto | cpu | cuda | cuda:N")
    allow_new_head: bool = setting(
        False, help="accept a checkpoint without its pretraining head (transformers then initializes it "
                    "randomly: the numbers measure that random head)")
    shard_size: int = setting(
        1, domain=checks.POSITIVE_INT, identity=False,
        help="under torchrun, shard the model over groups of this many ranks with FSDP2 (each rank holds 1/K of "
             "it); the world / K groups split the work; 1 = no sharding")
    threads: str = setting("auto", domain=THREADS, identity=False, metavar="auto|N", help=THREADS_HELP)

    def __post_init__(self):
        object.__setattr__(self, "source", _path_text(self.source))
        super().__post_init__()


@dataclass(frozen=True)
class SampleSpec(Settings):
    """Which packed sequences of which corpus a stage evaluates its loss on."""

    corpus: Optional[str] = setting(
        None, help="text file, JSONL file, HF dataset name or save_to_disk folder (default: the embedded corpus)")
    fraction: Optional[float] = setting(
        None, domain=checks.FRACTION,
        help="seeded document-level fraction of the corpus to use, in (0, 1] (default: all of it)")
    max_samples: Optional[int] = setting(None, domain=checks.POSITIVE_INT, unset="all that the corpus gives",
                                         help="at most this many packed sequences")
    seq_len: int = setting(128, domain=checks.SEQ_LEN, help="tokens per packed sequence")
    batch_size: int = setting(16, domain=checks.POSITIVE_INT, identity=False,
                              help="packed sequences per forward pass")
    seed: int = setting(0, domain=checks.SEED, help="seed for sub-sampling and masking")
    bos: str = setting("auto", choices=BOS_CHOICES,
                       help="BOS token first in every sample: auto = as the model's tokenizer frames a text, "
                            "yes = always, no = never")

    def __post_init__(self):
        object.__setattr__(self, "corpus", _path_text(self.corpus))
        super().__post_init__()

    def sampling(self) -> Dict[str, Any]:
        """The keyword arguments of ``data.corpus.load_batches`` (all but the corpus)."""
        return dict(fraction=self.fraction, max_samples=self.max_samples, seq_len=self.seq_len,
                    batch_size=self.batch_size, seed=self.seed, bos=self.bos)


Axis = Union[str, Tuple[float, ...]]


@dataclass(frozen=True)
class GridSpec(Settings):
    """The coefficients of a surface: a 1D line along x, or a 2D grid along x and y."""

    x: Axis = setting(DEFAULT_GRID, domain=checks.AXIS, help="MIN:MAX:NUM along the first direction")
    y: Optional[Axis] = setting(None, domain=checks.AXIS,
                                help=f"MIN:MAX:NUM along the second direction (default: {DEFAULT_GRID} for a "
                                     "2-direction file)")
    one_d: bool = setting(False, help="only the x direction of a 2-direction file (default: both directions)")

    def validate(self):
        """Refuse ``one_d`` together with a ``y`` range."""
        if self.one_d and self.y is not None:
            raise UsageError("one_d and y contradict each other; drop one")


def _sample_with(**defaults):
    return lambda: SampleSpec(**defaults)


# ------------------------------------------------------------------------------------ stages
@dataclass(frozen=True)
class FisherSettings(Settings):
    """``run_fisher``: the diagonal empirical Fisher of a model on a sample."""

    model: ModelSpec = setting(help="the model", factory=ModelSpec)
    sample: SampleSpec = setting(help="the sample (default: every sequence the corpus gives)", factory=SampleSpec)
    checkpoint_every: float = setting(60.0, domain=checks.NON_NEGATIVE, identity=False,
                                      help="seconds between checkpoints of the running sums")
    max_chunk_mb: Optional[float] = setting(
        None, domain=checks.CHUNK_MB, identity=False,
        help="memory for per-sample gradients at a time, in MB (default: 256, lowered to a quarter byte per model "
             "parameter for models under 1B parameters, at least 64)")


@dataclass(frozen=True)
class StabilitySettings(Settings):
    """``run_stability``: the Fisher of nested sub-samples against the reference (paper Table 1)."""

    model: ModelSpec = setting(help="the model", factory=ModelSpec)
    sample: SampleSpec = setting(help="the reference sample", factory=SampleSpec)
    fractions: Tuple[float, ...] = setting(STABILITY_FRACTIONS, domain=checks.ListDomain(checks.FRACTION),
                                           help="comma-separated fractions of the reference sample")
    top: Tuple[float, ...] = setting(STABILITY_TOP, domain=checks.ListDomain(checks.PERCENT),
                                     help="comma-separated top-k percentages")
    max_chunk_mb: Optional[float] = FisherSettings.__dataclass_fields__["max_chunk_mb"]
    checkpoint_every: float = FisherSettings.__dataclass_fields__["checkpoint_every"]


@dataclass(frozen=True)
class SurfaceSettings(Settings):
    """``run_surface``: loss and token accuracy on a grid along the directions of a direction file."""

    directions: str = setting(help="direction file from `landscape directions`")
    model: ModelSpec = setting(help="the model", factory=ModelSpec)
    sample: SampleSpec = setting(help="the evaluation sample", factory=_sample_with(max_samples=64))
    grid: GridSpec = setting(help="the grid", factory=GridSpec)
    eval_corpus: Optional[str] = setting(
        None, help="a held-out corpus (the forms --corpus takes), sampled with the same --fraction, --max-samples, "
                   "--seq-len, --seed and --bos: its loss and token accuracy at every point are written as "
                   "test_loss and test_acc, in the same pass over the grid (default: train_loss and train_acc only)")
    points_per_pass: int = setting(1, domain=checks.POSITIVE_INT, identity=False,
                                   help="grid points per vmapped forward pass; more helps on a GPU")
    flush_seconds: float = setting(2.0, domain=checks.NON_NEGATIVE, identity=False,
                                   help="seconds between rewrites of the HDF5 file; every point is journaled at once")
    stream_directions: bool = setting(
        False, help="keep the directions in host memory in float32 and copy them to the device at each point: "
                    "beside the model the device holds only a copy of its perturbed weights (default: the "
                    "directions are held on the device in the model's dtype)")

    def __post_init__(self):
        for name in ("directions", "eval_corpus"):
            value = getattr(self, name)
            object.__setattr__(self, name, _path_text(value))
        super().__post_init__()


SCHEDULE_SHAPES = ("linear", "log", "power")


@dataclass(frozen=True)
class ScheduleSettings(Settings):
    """``run_schedule``: a guided dropout schedule from a Fisher file and its model (paper eq. 9-10)."""

    fisher: str = setting(positional=True, help="Fisher file (safetensors) written by `landscape fisher`")
    # The model only gives shapes and sites: a checkpoint without its pretraining head is always accepted.
    model: ModelSpec = setting(help="the model", factory=ModelSpec, exclude=("allow_new_head", "shard_size"))
    p_upper: float = setting(0.1, domain=checks.BELOW_ONE, help="probability of the lowest-scored site")
    p_lower: float = setting(0.0, domain=checks.BELOW_ONE, help="probability of the highest-scored site")
    shape: str = setting("linear", choices=SCHEDULE_SHAPES,
                         help="linear in rank (paper), normalized log score, or a power of the rank")
    gamma: float = setting(2.0, domain=checks.POSITIVE, help="exponent of --shape power")
    lora: Optional[str] = setting(
        None, bare="", metavar="SPEC",
        help="guided LoRA dropout (needs landscape[lora]): one site per module LoRA adapts, named by the base module "
             "and scored by its Fisher, so the schedule serves any rank. The modules: those of a PEFT adapter --model "
             "(give --lora alone), or SPEC on the base model, as `finetune --lora`, e.g. targets=q_proj,v_proj "
             "(default: dropout sites)")

    def __post_init__(self):
        object.__setattr__(self, "fisher", _path_text(self.fisher))
        super().__post_init__()

    def validate(self):
        """Refuse ``p_lower`` above ``p_upper`` (``checks.dropout_bounds``, as the schedule's functions do)."""
        checks.dropout_bounds(self.p_upper, self.p_lower)


@dataclass(frozen=True)
class ProfileSettings(Settings):
    """``run_profile``: the Fisher per parameter, per dropout site, per tensor and per block."""

    fisher: str = setting(positional=True, help="a Fisher file written by `landscape fisher`")
    # Only shapes and sites are read from the model: the CPU is enough, and a new head is accepted.
    model: ModelSpec = setting(help="the model", factory=lambda: ModelSpec(device="cpu"),
                               exclude=("allow_new_head", "shard_size"))

    def __post_init__(self):
        object.__setattr__(self, "fisher", _path_text(self.fisher))
        super().__post_init__()


MASK_GRANULARITIES = ("global", "tensor")
IGNORES = ("biasbn", "none")
HVP_METHODS = ("exact", "difference")  # how a Hessian-vector product is formed (curvature.HessianOperator)
# What a model sharded with FSDP2 can hold for its Hessian: the products are formed in its own precision.
SHARDED_HESSIAN_PRECISIONS = ("float32", "float64")


def refuse_unshardable_hessian(hvp: str, precisions: Sequence[str]) -> None:
    """Refuse a Hessian-vector product that a model sharded with FSDP2 cannot give.

    The one home of the rule for every sharded Hessian (``hessian``, the Rayleigh quotient of
    ``critical-sharpness``, a ``curvature.HessianOperator`` of a sharded model): FSDP2 hands the
    gradient back by a reduce-scatter outside autograd's graph of the sharded parameters, so a
    double backward finds no path to them and gives zeros, not an error (tried); and a sharded
    model cannot be cast up to float32 in place for the products (docs/curvature.md, "Sharded").

    Args:
        hvp: how the products are formed (``HVP_METHODS``); only "difference" runs sharded.
        precisions: the precisions the model is (to be) held in, by name ("float32", "bfloat16", ...).

    Raises:
        SettingsRefused: naming ``shard_size`` with ``hvp`` or ``dtype``.
    """
    if hvp == "exact":
        raise SettingsRefused("{shard_size} > 1 needs the gradient-only product ({hvp} difference): a model "
                              "sharded with FSDP2 takes no double backward")
    held = sorted(set(precisions) - set(SHARDED_HESSIAN_PRECISIONS))
    if held:
        raise SettingsRefused("{shard_size} > 1 needs {dtype} float32, not {held}: the sharded products are formed "
                              "in the model's own precision", held=", ".join(held))


@dataclass(frozen=True)
class HessianSettings(Settings):
    """``run_hessian``: top eigenpairs, trace and spectral density of the loss Hessian (or of P·H·P)."""

    model: ModelSpec = setting(help="the model", factory=ModelSpec)
    sample: SampleSpec = setting(help="the sample", factory=_sample_with(max_samples=64))
    top: int = setting(2, domain=checks.int_in(0, checks.EIGENPAIRS_MAX), help="top eigenpairs; 0 = none")
    trace: int = setting(0, domain=checks.TRACE_PROBES, metavar="N",
                         help="Hutchinson probes for the trace, e.g. 100; 0 = no trace")
    spectrum: int = setting(0, domain=checks.SPECTRUM_RUNS, metavar="RUNS",
                            help="stochastic Lanczos quadrature runs for the density, e.g. 10; 0 = none")
    steps: int = setting(80, domain=checks.int_in(1, checks.LANCZOS_STEPS_MAX), help="Lanczos steps per spectrum run")
    bins: int = setting(200, domain=checks.int_in(1, checks.BINS_MAX), help="histogram bins of the density")
    tol: float = setting(1e-4, domain=checks.OPEN_UNIT, help="eigenpairs converge when |Hv - λv| <= tol·|λ|")
    max_iter: int = setting(500, domain=checks.HVP_BUDGET,
                            help="at most this many Hessian-vector products for the eigenpairs")
    fisher: Optional[str] = setting(None, help="Fisher file (safetensors) for --subset")
    subset: str = setting(
        "all", help="top:K | bottom:K | random:K | all: the Hessian restricted to those parameters (P·H·P; K in "
                    "percent of the perturbable elements); adapter: only the parameters of a PEFT adapter --model "
                    "(no --fisher)")
    granularity: str = setting("global", choices=MASK_GRANULARITIES, flag="--mask-granularity",
                               help="rank elements over the whole model (global) or inside each tensor (tensor)")
    ignore: str = setting("biasbn", choices=IGNORES,
                          help="biasbn: 1-D tensors (biases, LayerNorm) are not coordinates, as directions do not "
                               "perturb them; none: every trainable element (the full Hessian)")
    hvp: str = setting("exact", choices=HVP_METHODS,
                       help="Hessian-vector products: exact (double backward) or difference (central differences of "
                            "four gradients: no second derivative needed, relative error <= 3e-4 in float32)")
    cache_mb: float = setting(1024.0, domain=checks.CACHE_MB, identity=False,
                              help="memory for the cached first-order graphs, in MB; 0 = recompute")
    basis_mb: float = setting(1024.0, domain=checks.CACHE_MB, identity=False,
                              help="memory for a Lanczos basis (top eigenpairs, each spectrum run), in MB; a larger "
                                   "one goes to a temporary file, read a block at a time")

    def __post_init__(self):
        if self.fisher is not None:
            object.__setattr__(self, "fisher", _path_text(self.fisher))
        if self.subset is None:
            object.__setattr__(self, "subset", "all")
        super().__post_init__()

    def validate(self):
        """Refuse a run with nothing to compute, fewer products than eigenpairs, or a sharded Hessian it cannot give."""
        if not (self.top or self.trace or self.spectrum):
            raise UsageError("nothing to compute: ask for eigenpairs, a trace or a spectrum")
        if self.top and self.max_iter < self.top:
            raise UsageError(f"max_iter ({self.max_iter}) must be at least the number of eigenpairs ({self.top})")
        if self.model.shard_size > 1:
            refuse_unshardable_hessian(self.hvp, [self.model.dtype])


CRITICAL_TOLERANCE = checks.Domain("float", 0.0, 0.05, low_open=True)  # the contract: at most 5%


@dataclass(frozen=True)
class CriticalSharpnessSettings(Settings):
    """``run_critical_sharpness``: λ_c = 2/η_c, η_c the smallest step along a direction at which the loss rises.

    The loss is the sample's (``sample.corpus``); the gradient directions are those of the same
    sample drawn from ``update_corpus`` (None: the loss's own corpus).  Unlike the curvature
    stage, only forward passes walk the line (``curvature.critical``).
    """

    model: ModelSpec = setting(help="the model", factory=ModelSpec)
    sample: SampleSpec = setting(help="the sample whose loss is walked", factory=_sample_with(max_samples=64))
    update_corpus: Optional[str] = setting(
        None, unset="--corpus", help="corpus (the forms --corpus takes) whose gradient gives the update direction, "
                                     "sampled with the same --fraction, --max-samples, --seq-len, --seed and --bos: "
                                     "relative critical sharpness of the --corpus loss along that update")
    direction: str = setting(
        "gradient", metavar="gradient|sign|FILE.h5",
        help="the update d: gradient (-grad L of the update corpus), sign (-sign grad L, Adam's first step) or a "
             "direction file (.h5; its first direction, as written)")
    tolerance: float = setting(0.05, domain=CRITICAL_TOLERANCE,
                               help="relative tolerance of the critical step eta_c, in (0, 0.05]")
    rayleigh: bool = setting(False, help="also the Rayleigh quotient d'Hd/d'd of the loss's Hessian, from one "
                                         "Hessian-vector product")
    # The report records it itself, and only with the quotient when not exact (critical._recorded).
    hvp: str = setting("exact", choices=HVP_METHODS, identity=False,
                       help="the quotient's Hessian-vector product: exact (double backward) or difference (central "
                            "differences of four gradients)")

    def __post_init__(self):
        for name in ("update_corpus", "direction"):
            object.__setattr__(self, name, _path_text(getattr(self, name)))
        super().__post_init__()

    def validate(self):
        """Refuse a bad direction, settings the run would ignore, and a sharded quotient it cannot form.

        A direction is a kind or a file's name; the sharded quotient's product follows
        ``refuse_unshardable_hessian``, as ``hessian``'s does.
        """
        if self.direction not in CRITICAL_DIRECTIONS and not str(self.direction).lower().endswith((".h5", ".hdf5")):
            raise UsageError(f"direction must be gradient, sign or a direction file (.h5), got {self.direction!r}")
        if self.direction not in CRITICAL_DIRECTIONS and self.update_corpus is not None:
            raise SettingsRefused("{update_corpus} gives a gradient direction: a direction file does not use it")
        if self.hvp != "exact" and not self.rayleigh:
            raise SettingsRefused("{hvp} applies to {rayleigh} only")
        if self.rayleigh and self.model.shard_size > 1:  # the quotient's product is a sharded Hessian's
            refuse_unshardable_hessian(self.hvp, [self.model.dtype])


CRITICAL_DIRECTIONS = ("gradient", "sign")


TASKS = ("auto", "classification", "regression")
# Every regularizer a sweep trains (``guided.training`` builds them); dropout is the paired baseline.
REGULARIZERS = ("none", "dropout", "gaussian", "guided", "dropout-matched", "guided-shuffled", "r3f", "r4f",
                "mixout", "childtuning")
R3F_NOISES = ("normal", "uniform")


def _by_model(key: str) -> str:
    """What a setting left None means when its default depends on the model (``defaults.FINETUNE_*``)."""
    paper = FINETUNE_PAPER[key]
    return (f"{FINETUNE_EMBEDDED[key]} on the embedded model, {'all' if paper is None else paper} with --model, "
            "as in the paper")


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    """``run_finetune``: a data-paucity sweep, once per regularizer, training-set fraction and restart seed.

    ``lr``, ``batch_size``, ``seq_len``, ``max_train`` and ``max_test`` left None take the model's
    defaults (``defaults.FINETUNE_EMBEDDED`` for the embedded model, ``FINETUNE_PAPER`` with a model
    source; ``lr`` with ``lora`` is ``defaults.FINETUNE_LORA_LR``).
    """

    # Each run loads the checkpoint afresh with a new head in float32 (the head is new by design).
    model: ModelSpec = setting(help="the model", factory=ModelSpec, exclude=("dtype", "allow_new_head", "shard_size"),
                               helps={"source": "HF model id or from_pretrained folder (default: the embedded model)"})
    dataset: Optional[str] = setting(None, unset="the embedded sentiment set",
                                     help="CSV/TSV/JSONL with text and label columns, or a HF dataset name/folder")
    text_column: str = setting("text", help="column of the text, the first of a pair")
    pair_column: Optional[str] = setting(None, unset="single texts", help="second text column for sentence-pair tasks")
    label_column: str = setting("label", help="column of the label")
    task: str = setting("auto", choices=TASKS,
                        help="auto: classification for non-numeric labels or integers with at most max(20, rows/50) "
                             "distinct values, regression otherwise")
    regularizer: Tuple[str, ...] = setting(
        "dropout,gaussian,guided,r3f", domain=checks.WordList("regularizer", REGULARIZERS),
        help="comma-separated: none, dropout, gaussian, guided, dropout-matched (uniform at the guided schedule's "
             "mean p), guided-shuffled (the schedule's probabilities on a random permutation of its sites, a new one "
             "per restart seed), r3f, r4f, mixout, childtuning (ChildTuning-D). guided, dropout-matched and "
             "guided-shuffled need --schedule or --fisher; dropout is the baseline of the paired statistics")
    schedule: Optional[str] = setting(None, unset="made from --fisher",
                                      help="guided dropout schedule JSON, from `landscape schedule`")
    fisher: Optional[str] = setting(None, unset="none; give it or --schedule for guided",
                                    help="pretraining Fisher file to compute the guided schedule from instead")
    p_upper: float = setting(0.1, domain=checks.BELOW_ONE, help="guided schedule from --fisher: upper bound")
    p_lower: float = setting(0.0, domain=checks.BELOW_ONE, help="guided schedule from --fisher: lower bound")
    fractions: Tuple[float, ...] = setting((1.0,), domain=checks.ListDomain(checks.FRACTION),
                                           help="training-set fractions, e.g. 1,0.5,0.25,0.1")
    restarts: int = setting(6, domain=checks.RESTARTS,
                            help="restart seeds per fraction (6: with n restarts the exact paired Wilcoxon p cannot go "
                                 "below 2/2^n, so 6 is the fewest that can reach p < 0.05)")
    seed: int = setting(0, domain=checks.SEED, help="first restart seed")
    split_seed: int = setting(0, domain=checks.SEED, help="seed of the fixed train/test split")
    test_fraction: float = setting(0.2, domain=checks.OPEN_UNIT, help="test share when the dataset has one split")
    max_train: Optional[int] = setting(None, domain=checks.POSITIVE_INT, unset=_by_model("max_train"),
                                       help="cap on training rows at fraction 1")
    max_test: Optional[int] = setting(None, domain=checks.POSITIVE_INT, unset=_by_model("max_test"),
                                      help="cap on test rows")
    lr: Optional[float] = setting(None, domain=checks.POSITIVE, unset=_by_model("lr"), help="peak learning rate")
    batch_size: Optional[int] = setting(None, domain=checks.POSITIVE_INT, unset=_by_model("batch_size"),
                                        help="examples per step")
    seq_len: Optional[int] = setting(None, domain=checks.SEQ_LEN, unset=_by_model("seq_len"),
                                     help="max tokens per example")
    epochs: int = setting(3, domain=checks.EPOCHS, help="passes over the training rows")
    warmup: float = setting(0.1, domain=checks.PROBABILITY, help="warm-up share of all steps")
    weight_decay: float = setting(0.0, domain=checks.NON_NEGATIVE, help="AdamW weight decay")
    dropout: float = setting(0.1, domain=checks.BELOW_ONE, help="standard/Gaussian dropout probability")
    r3f_lambda: float = setting(
        1.0, domain=checks.NON_NEGATIVE,
        help="r3f/r4f: weight of the symmetric KL between the outputs on clean and on noised embeddings")
    r3f_sigma: float = setting(1e-5, domain=checks.POSITIVE, help="r3f/r4f: scale of the embedding noise")
    r3f_noise: str = setting("normal", choices=R3F_NOISES, help="r3f/r4f: distribution of the embedding noise")
    mixout_p: float = setting(0.9, domain=checks.BELOW_ONE,
                              help="mixout: probability of mixing a body weight back to its pretrained value")
    childtuning_reserve: float = setting(
        0.3, domain=checks.FRACTION,
        help="ChildTuning-D: share of the body's elements that train, those with the highest task Fisher on the "
             "run's training subset")
    metric: Optional[str] = setting(
        None, identity=False,
        help="metric to plot: accuracy|f1|mcc (classification, default accuracy) or pearson|spearman (regression, "
             "default pearson)")
    lora: Optional[str] = setting(
        None, metavar="SPEC",
        help="fine-tune with LoRA (needs peft: pip install 'landscape[lora]') instead of all weights, e.g. "
             "r=8,alpha=16,targets=q_proj,v_proj (default targets: PEFT's for the architecture; alpha 2r). "
             "Regularizers then set each LoRA module's lora_dropout: none, dropout, gaussian, guided (from --fisher "
             "of the base model or a `schedule --lora` file), dropout-matched, guided-shuffled; default lr 5e-4 "
             "(default: full fine-tuning)")

    def __post_init__(self):
        for name in ("dataset", "schedule", "fisher"):
            value = getattr(self, name)
            object.__setattr__(self, name, _path_text(value))
        super().__post_init__()



DIRECTION_KINDS = ("random", "hessian", "interpolation", "trajectory")
DIRECTION_NORMS = ("filter", "layer", "none")
DIRECTION_PRECISIONS = ("float32", "bfloat16", "float16")
_PATHS = {"to": "interpolation", "checkpoints": "trajectory"}  # the setting that implies a kind
# What each kind reads beside the model's source, allow_new_head and threads.  Any other setting must
# keep its default: a value the kind would ignore is refused rather than silently dropped.
_READS = {"random": {"seed", "dims", "norm", "ignore", "fisher", "subset", "granularity", "orthogonal", "dtype",
                     "shard_size"},
          "hessian": {"seed", "dims", "ignore", "fisher", "subset", "granularity", "tol", "device", "corpus",
                      "max_samples", "seq_len", "batch_size", "sample_seed", "bos", "hvp"},
          "interpolation": {"to"}, "trajectory": {"checkpoints"}}
_HESSIAN_ONLY = ("corpus", "fraction", "max_samples", "seq_len", "batch_size", "sample_seed", "bos", "tol", "device",
                 "hvp")


@dataclass(frozen=True)
class DirectionsSettings(Settings):
    """``make_directions``: a direction file of one kind (random, hessian, interpolation, trajectory).

    ``to`` implies the interpolation kind and ``checkpoints`` the trajectory kind (the command
    line's ``--to`` and ``--trajectory``); every setting the kind does not read keeps its default.
    """

    model: ModelSpec = setting(help="the model (interpolation: model A; trajectory: the plane's origin)",
                               factory=ModelSpec)
    kind: str = setting("random", choices=DIRECTION_KINDS,
                        help="random: seeded Gaussian directions; hessian: eigenvector axes; interpolation and "
                             "trajectory: implied by --to and --trajectory")
    seed: int = setting(0, domain=checks.SEED, help="seed of the directions and of random masks")
    dims: int = setting(2, domain=checks.int_in(1, 2),
                        help="number of directions: 1 for a 1D curve, 2 for a 2D surface")
    norm: str = setting("filter", choices=DIRECTION_NORMS,
                        help="rescale each filter (output unit) or each whole tensor of a direction to the norm of "
                             "the same part of the weights (Li et al.), or leave the Gaussian as drawn")
    ignore: str = setting("biasbn", choices=IGNORES,
                          help="biasbn: 1-D tensors (biases, LayerNorm) are not perturbed; none: every tensor is")
    fisher: Optional[str] = setting(None, help="Fisher file (safetensors) for --subset")
    subset: str = setting(
        "all", help="top:K | bottom:K | random:K | all (K in percent, (0, 100]), or adapter: only the parameters of "
                    "a PEFT adapter --model (its LoRA factors and saved head; no --fisher)")
    granularity: str = setting("global", choices=MASK_GRANULARITIES, flag="--mask-granularity",
                               help="rank elements over the whole model (global) or inside each tensor (tensor, as "
                                    "the paper's code does)")
    orthogonal: bool = setting(False, flag="--orthogonalize",
                               help="make the second direction orthogonal to the first (default: two independent "
                                    "draws)")
    sample: SampleSpec = setting(help="hessian: the sample (the defaults of `landscape surface`)",
                                 factory=_sample_with(max_samples=64), exclude=("fraction",),
                                 rename={"seed": "sample_seed"})
    tol: float = setting(1e-4, domain=checks.OPEN_UNIT, help="hessian: eigenpair tolerance")
    # The file records it itself, and only when not exact (curvature.stage.eigen_directions).
    hvp: str = setting("exact", choices=HVP_METHODS, identity=False,
                       help="hessian: Hessian-vector products, exact (double backward) or difference (central "
                            "differences of four gradients)")
    to: Optional[str] = setting(
        None, metavar="MODEL_B", help="one direction θ_B − θ_A from --model A to MODEL_B (x = 0 is A, x = 1 is B; "
                                      "--dims does not apply; default: random directions)")
    checkpoints: Optional[Tuple[str, ...]] = setting(
        None, flag="--trajectory", nargs="+", metavar="CKPT",
        help="checkpoints in training order (at least 4): the top-2 PCA plane relative to the last one, which is "
             "the plane's origin; --model must be that last checkpoint (it is when --model is left out; default: "
             "random directions)")

    def __post_init__(self):
        for name in ("fisher", "to"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))  # a Path
        if isinstance(self.checkpoints, str):
            raise UsageError("checkpoints must be a list of checkpoints, got one string")
        if self.checkpoints is not None:
            object.__setattr__(self, "checkpoints", tuple(str(c) for c in self.checkpoints))
        if self.subset is None:
            object.__setattr__(self, "subset", "all")
        super().__post_init__()

    def validate(self):
        """Settle the kind ``to`` or ``checkpoints`` imply; refuse settings that contradict it or each other."""
        given = [name for name in _PATHS if getattr(self, name) is not None]
        if len(given) == 2:
            raise SettingsRefused("{to} and {checkpoints} contradict each other; give one")
        if given and self.kind not in ("random", _PATHS[given[0]]):
            raise SettingsRefused("{kind} %s and {%s} contradict each other; give one" % (self.kind, given[0]))
        kind = _PATHS[given[0]] if given else self.kind
        object.__setattr__(self, "kind", kind)
        if kind in ("interpolation", "trajectory") and not given:
            needs = "to" if kind == "interpolation" else "checkpoints"
            raise SettingsRefused("{kind} %s needs {%s}" % (kind, needs))
        changed = [name for name, (value, default) in self._leaves().items() if value != default]
        extra = [name for name in changed if name not in _READS[kind]]
        if kind != "hessian" and set(extra) & set(_HESSIAN_ONLY):
            first = next(name for name in extra if name in _HESSIAN_ONLY)
            what = "sets the Hessian's sample: it applies" if first not in ("tol", "device", "hvp") else "applies"
            raise SettingsRefused("{%s} %s to {kind} hessian only" % (first, what))
        if given and {"fisher", "subset"} & set(extra):
            raise SettingsRefused("{%s} writes raw parameter differences: {fisher}/{subset} do not apply" % given[0])
        if extra:
            why = ("{%s} writes raw parameter differences" % given[0] if given else
                   "{kind} hessian writes unit-norm, orthogonal eigenvectors of the float32 model on one device")
            raise SettingsRefused(why + ": {%s} does not apply" % extra[0])
        if kind in ("random", "hessian"):
            self._check_mask()
        if kind == "random" and self.model.dtype not in DIRECTION_PRECISIONS:
            raise SettingsRefused("{dtype} %s is a matmul precision: direction files hold %s"
                                  % (self.model.dtype, ", ".join(DIRECTION_PRECISIONS)))

    def _check_mask(self):
        """Refuse a subset that cannot be made from the Fisher file given (or not given)."""
        if self.subset == "adapter" and self.fisher:
            raise SettingsRefused("{subset} adapter selects the adapter's parameters by name: {fisher} does not "
                                  "apply")
        if self.subset not in ("all", "adapter") and not self.fisher:
            raise SettingsRefused("{subset} {value} needs a Fisher file ({fisher} F.safetensors)", value=self.subset)

    def _leaves(self) -> Dict[str, Tuple[Any, Any]]:
        """{setting: (value, default)} of every setting a kind may not read, by the command line's names."""
        out = {spec.name: (getattr(self, spec.name), spec.default) for spec in fields(self)
               if spec.name not in ("kind", "model", "sample")}
        model, sample = ModelSpec(), self.__dataclass_fields__["sample"].default_factory()
        out.update({name: (getattr(self.model, name), getattr(model, name)) for name in ("dtype", "device",
                                                                                       "shard_size")})
        out.update({("sample_seed" if spec.name == "seed" else spec.name):
                    (getattr(self.sample, spec.name), getattr(sample, spec.name)) for spec in fields(sample)})
        return out
