"""Command-line options generated from a stage's settings dataclass (``landscape.settings``).

Each ``setting()`` field becomes one option: its flag, help, default, domain (as an argparse type
from ``cli/options.py``) and choices come from the field, so a new setting is one field and no
keyword list is copied here.  A nested spec (``ModelSpec``, ``SampleSpec``, ``GridSpec``) becomes an
argument group of its fields; ``settings_from_args`` builds the settings object back from the
parsed namespace.  Standard library only, like the parsers.
"""

import argparse
from dataclasses import MISSING, fields
from typing import Any, Dict, Type

from .. import checks
from ..settings import THREADS, Settings
from . import options

_GROUP_TITLES = {"model": "model", "sample": "corpus", "grid": "grid"}


def add_settings_arguments(parser: argparse.ArgumentParser, cls: Type[Settings]) -> None:
    """One option per field of ``cls`` (a nested spec's fields in a group of their own)."""
    defaults = _defaults(cls)
    for spec in fields(cls):
        nested = defaults.get(spec.name)
        if isinstance(nested, Settings):
            group = parser.add_argument_group(_GROUP_TITLES.get(spec.name, spec.name))
            helps, rename = spec.metadata.get("helps", {}), spec.metadata.get("rename") or {}
            for inner in fields(nested):
                if inner.name not in spec.metadata.get("exclude", ()):
                    _add(group, inner, getattr(nested, inner.name), helps.get(inner.name), rename.get(inner.name))
        else:
            _add(parser, spec, defaults.get(spec.name, MISSING))


def settings_from_args(cls: Type[Settings], args: argparse.Namespace) -> Settings:
    """The ``cls`` settings that the parsed options ``args`` say (the inverse of ``add_settings_arguments``)."""
    values: Dict[str, Any] = {}
    defaults = _defaults(cls)
    for spec in fields(cls):
        nested = defaults.get(spec.name)
        if isinstance(nested, Settings):
            rename, exclude = spec.metadata.get("rename") or {}, spec.metadata.get("exclude", ())
            # An excluded field keeps the spec's default, even where another option shares its name.
            given = {f.name: getattr(args, rename.get(f.name, f.name)) for f in fields(nested)
                     if f.name not in exclude and hasattr(args, rename.get(f.name, f.name))}
            values[spec.name] = nested.replace(**given)
        else:
            values[spec.name] = getattr(args, spec.name)
    return cls(**values)


def _defaults(cls) -> Dict[str, Any]:
    """Each field's default value (a nested spec's default object), MISSING for a required field."""
    out = {}
    for spec in fields(cls):
        if spec.default_factory is not MISSING:
            out[spec.name] = spec.default_factory()
        else:
            out[spec.name] = spec.default
    return out


def _add(parser, spec, default, help_text=None, name=None) -> None:
    """The option of field ``spec``; for a nested spec's field, the stage's own help and name (its dest and flag)."""
    meta = spec.metadata
    flag = ("--" + name.replace("_", "-")) if name else meta.get("flag") or "--" + spec.name.replace("_", "-")
    text = (help_text or meta["help"]) + (f" (default: {meta['unset']})" if default is None and meta.get("unset")
                                          else "")
    if meta.get("positional"):
        parser.add_argument(spec.name, help=text)
        return
    names = [flag, *meta.get("aliases", ())]
    kwargs: Dict[str, Any] = dict(dest=name or spec.name, help=text)
    kwargs["metavar"] = meta.get("metavar") or flag.lstrip("-").replace("-", "_").upper()
    if meta.get("nargs"):
        kwargs["nargs"] = meta["nargs"]
    if meta.get("bare", MISSING) is not MISSING:
        kwargs.update(nargs="?", const=meta["bare"])
    if default is MISSING:
        kwargs["required"] = True
    elif isinstance(default, bool):
        kwargs.pop("metavar")
        parser.add_argument(*names, action="store_true", **kwargs)
        return
    else:
        kwargs["default"] = _shown(default)
    argument_type = meta.get("convert") or _type_of(meta.get("domain"))
    if argument_type is not None:
        kwargs["type"] = argument_type
    if meta.get("choices") is not None:
        kwargs["choices"] = meta["choices"]
        kwargs.pop("metavar", None)  # argparse lists the choices itself
    parser.add_argument(*names, **kwargs)


def _shown(default):
    """A default as the option's text would give it (a tuple of numbers as 'a,b,c')."""
    if isinstance(default, tuple):
        return ",".join(f"{value:g}" for value in default)
    return default


def _type_of(domain):
    """The argparse type that refuses what ``domain`` refuses, while parsing (None: a plain string).

    A domain of another kind (``checks.WordList``) is checked when the settings are made from the
    parsed text (``settings_from_args``), in the library's words.
    """
    if domain is THREADS:
        return options.THREADS
    if isinstance(domain, checks.ListDomain):
        return options.NumberList(domain.item)
    if isinstance(domain, checks.AxisDomain):
        return options.Range(domain.num_max)
    if isinstance(domain, checks.Domain):
        return options.Number(domain)
    return None


def add_output_arguments(parser: argparse.ArgumentParser, out_help: str, *, overwrite_help: str = None,
                         quiet: bool = True) -> None:
    """``--out`` (required), ``--overwrite`` and ``--quiet``: what every stage's output takes beside its settings."""
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--overwrite", action="store_true",
                        help=overwrite_help or "replace an --out computed with other settings, or holding another "
                                               "kind of file (default: refuse)")
    if quiet:
        add_quiet_arg(parser)


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress at all (``progress.quiet``), the model-load bar included."""
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (default: a bar on a terminal; elsewhere, as in a log file, a line at "
                             "most every 30 s and one at the end)")
