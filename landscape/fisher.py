"""Diagonal empirical Fisher information of a pretrained LM (paper sections 2.1-2.3).

File format (contract): safetensors, one tensor per parameter named as in
``model.named_parameters()``, provenance as string metadata in the header.  Never pickled.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UsageError
from .io import atomic_output, require_readable_file


def save_fisher(path, fisher, metadata=None):
    """Write {param name: tensor} and string metadata to a safetensors file, atomically."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in fisher.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_fisher(path):
    """Read a Fisher file: returns ({param name: float32 tensor}, {metadata key: str})."""
    path = require_readable_file(path, "Fisher file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"'{path}' is not a Fisher file (safetensors): {str(err).splitlines()[0]}") from None
