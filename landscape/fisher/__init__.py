"""Diagonal empirical Fisher information of a pretrained LM (paper sections 2.1-2.3).

F_j = (1/N) Σ_n (∂ℓ_n/∂θ_j)², ℓ_n = mean target-token cross-entropy of sample (sequence) n, model in
eval mode, exact per-sample gradients, batched.

Modules: ``rules`` (per-layer per-sample gradient rules, registered by module type),
``accumulator`` (hooks and running sums), ``run`` (passes over data with checkpoints and ranks),
``file`` (the safetensors file), ``stability`` (top-k overlap across sub-samples).
"""

from .accumulator import FisherAccumulator
from .budget import DEFAULT_CHUNK_MB
from .file import (
           DEFINITION,
           check_existing_fisher,
           check_fisher_matches,
           check_fisher_model,
           check_fisher_values,
           fisher_metadata,
           load_fisher,
           provenance,
           save_fisher,
)
from .run import compute_fisher, nested_fisher

__all__ = ["DEFAULT_CHUNK_MB", "DEFINITION", "FisherAccumulator", "check_existing_fisher", "check_fisher_matches",
           "check_fisher_model", "check_fisher_values", "compute_fisher", "fisher_metadata", "load_fisher",
           "nested_fisher", "provenance", "save_fisher"]
