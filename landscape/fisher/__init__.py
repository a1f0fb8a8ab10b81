"""Diagonal empirical Fisher information of a pretrained LM (paper sections 2.1-2.3).

F_j = (1/N) Σ_n (∂ℓ_n/∂θ_j)², ℓ_n = mean target-token cross-entropy of sample (sequence) n, model in
eval mode, exact per-sample gradients, batched.

Modules: ``rules`` (per-layer per-sample gradient rules, registered by module type),
``accumulator`` (hooks and running sums), ``run`` (passes over data with checkpoints and ranks),
``file`` (the safetensors file), ``stability`` (top-k overlap across sub-samples), ``stage``
(``run_fisher`` and ``run_stability``: one call each, model and corpus loaded from a spec).
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
from .stage import FisherResult, StabilityResult, run_fisher, run_stability

__all__ = ["DEFAULT_CHUNK_MB", "DEFINITION", "FisherAccumulator", "FisherResult", "StabilityResult",
           "check_existing_fisher", "check_fisher_matches", "check_fisher_model", "check_fisher_values",
           "compute_fisher", "fisher_metadata", "load_fisher", "nested_fisher", "provenance", "run_fisher",
           "run_stability", "save_fisher"]
