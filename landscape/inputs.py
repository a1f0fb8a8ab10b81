"""What a stage reads before it computes: its model (from a spec, or one already loaded) and its sample.

Every stage that runs a model goes through ``stage_model`` and ``sample_batches``, so a loaded
model is accepted, checked and recorded the same way everywhere, and the CPU thread policy
(``ModelSpec.threads``) and the matmul precision (``ModelSpec.dtype``) are applied by the stage
itself for its duration: a Python call runs as the command would.
"""

import contextlib
from typing import Iterator, List, Optional

from .errors import UsageError
from .models import LoadedModel
from .settings import ModelSpec, SampleSpec


@contextlib.contextmanager
def stage_runtime(spec: ModelSpec) -> Iterator[int]:
    """Run the body as the spec says, then leave the process as it was found.

    ``spec.threads`` CPU threads (``runtime.apply_threads``; torch's count is restored after) and
    ``spec.dtype``'s matmul precision (``runtime.precision_context``: TF32 on for 'tf32' only).

    Yields:
        the intra-op thread count in use.
    """
    import torch

    from .runtime import apply_threads, precision_context

    before = torch.get_num_threads()
    try:
        with precision_context(spec.dtype):
            yield apply_threads(spec.threads)
    finally:
        torch.set_num_threads(before)


def stage_model(spec: ModelSpec, model: Optional[LoadedModel] = None, layout=None, device=None,
                corpora=()) -> LoadedModel:
    """The stage's model: ``model`` when one is given (checked against ``spec``), else loaded from ``spec``.

    Args:
        spec: the settings' model spec.
        model: a ``models.LoadedModel`` already in memory, or None to load ``spec.source``.
        layout: a ``sharding.ShardLayout`` (None: not sharded).
        device: the device to load on (None: ``spec.device``).
        corpora: corpora the stage will read, checked for reachability before a model is loaded.

    Returns:
        The loaded model.

    Raises:
        UsageError: a loaded model that contradicts the spec (another source or dtype), or what
            ``models.load_model`` raises.
    """
    from .data.hf_datasets import check_reachable
    from .models import load_model

    for corpus in corpora:
        check_reachable(corpus)  # before the model is loaded for nothing
    if model is None:
        return load_model(spec.source, device=device or spec.device, dtype=spec.dtype,
                          allow_new_head=spec.allow_new_head, layout=layout)
    _check_loaded(spec, model)
    return model


def _check_loaded(spec: ModelSpec, loaded: LoadedModel) -> None:
    """Refuse a loaded model the settings do not describe: the files would record the settings' model."""
    from .runtime import storage_dtype

    if not isinstance(loaded, LoadedModel):
        raise UsageError(f"model must be a models.LoadedModel (or None to load the settings' model), "
                         f"got {type(loaded).__name__}")
    if spec.source is not None and str(spec.source) != str(loaded.source):
        raise UsageError(f"the settings name the model '{spec.source}' but the loaded model is '{loaded.source}'; "
                         "leave the settings' model source out when passing a loaded model")
    held = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
    if held != storage_dtype(spec.dtype):
        raise UsageError(f"the settings say dtype {spec.dtype} but the loaded model holds {held}; "
                         f"give dtype='{held}' in the model spec")


def sample_batches(loaded: LoadedModel, sample: SampleSpec, corpus: Optional[str] = None,
                   device=None) -> List[dict]:
    """The sample's batches for ``loaded`` (``data.corpus.load_batches``), from ``corpus`` or the sample's own."""
    from .data.corpus import load_batches

    return load_batches(loaded, corpus=sample.corpus if corpus is None else corpus, device=device,
                        **sample.sampling())
