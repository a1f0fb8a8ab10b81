"""landscape: Fisher information, loss landscapes and guided dropout for pretrained language models.

The pipeline stages are submodules; import them explicitly, e.g. ``from landscape import fisher``.
``models``, ``corpus``, ``fisher``, ``directions``, ``surface``, ``schedule``, ``regularizers`` are
the entry points of DESIGN.md.  The code is laid out by concern (imports flow one way, from the
command line down to the core):

* core: ``errors``, ``files``, ``runtime`` (distribution, logging, precision), ``datahome``, ``hub`` (is
  a hub name worth asking for), ``defaults`` (shared with ``--help``, so stdlib only), ``models``,
  ``direction_file``
* ``data/``: objectives, corpora, labelled sets, sub-sampling, the embedded texts and model
* ``fisher/``: per-layer rules, the accumulator, runs, the file, stability, masks and subsets
* ``surface/``: directions, perturbation, evaluation, the file and its journal, sharpness
* ``curvature/``: linear operators (the Hessian's, the diagonal Fisher's), Lanczos eigenpairs,
  trace and spectrum on any of them, their checkpoints; a peer of ``surface`` (neither imports
  the other: ``direction_kinds`` above them combines both)
* ``testing/``: dense references for the tests
* ``plots/``: figures of surfaces
* ``guided/``: dropout sites, profiles, schedules, regularizers, fine-tuning and sweeps
* ``cli/``: the ``landscape`` command line; ``demo``: the whole pipeline as declared stages
"""

__version__ = "0.1.0"
