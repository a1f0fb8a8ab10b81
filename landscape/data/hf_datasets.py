"""Opening a Hugging Face dataset, for corpora and labelled sets alike."""

from pathlib import Path

from ..errors import UsageError


def is_hub_name(spec) -> bool:
    """Whether a corpus or dataset spec names a hub dataset (not a local file or folder, not path-like)."""
    spec = str(spec)
    return not (Path(spec).expanduser().exists() or Path(spec).suffix or spec.startswith((".", "/", "~")))


def check_reachable(spec) -> None:
    """Refuse at once a corpus or dataset spec naming a hub dataset the hub cannot provide now.

    A stage calls it before loading its model, which would then be loaded for nothing.

    Args:
        spec: a corpus or dataset spec, or None (the embedded corpus: reachable when the data home
            is a folder).

    Raises:
        UsageError: the spec names a hub dataset and the hub cannot provide it, or the data home of
            the embedded corpus is a file.
    """
    if spec is None:  # the embedded corpus lives in the data home: refuse a file there now
        from ..datahome import data_home

        data_home()
    elif is_hub_name(spec):
        check_hub_name(spec)


def check_hub_name(spec) -> None:
    """UsageError at once (no half minute of retries) when the hub cannot provide dataset ``spec`` now."""
    from ..hub import unavailable

    reason = unavailable(str(spec).partition(":")[0], "dataset")
    if reason is not None:
        raise UsageError(f"cannot load dataset '{spec}': it is not a local file or folder, and {reason}")


def open_hf_dataset(spec):
    """Open a Hugging Face dataset.

    Args:
        spec: a ``save_to_disk`` folder or a hub name (``name`` or ``name:config``).

    Returns:
        A ``Dataset`` or ``DatasetDict``.

    Raises:
        UsageError: it cannot be had.
    """
    try:
        import datasets
    except ImportError:
        raise UsageError("reading a Hugging Face dataset needs the 'datasets' package: "
                         "pip install 'landscape[hf]'") from None
    name, _, config = spec.partition(":")
    if not Path(spec).is_dir():
        check_hub_name(spec)
    try:
        if Path(spec).is_dir():
            return datasets.load_from_disk(spec)
        return datasets.load_dataset(name, config or None)
    except Exception as err:  # datasets raises many types; any of them means "cannot read it"
        raise UsageError(f"cannot load dataset '{spec}': {str(err).splitlines()[0]}") from None
