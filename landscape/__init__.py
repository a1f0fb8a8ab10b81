"""landscape: Fisher information, loss landscapes and guided dropout for pretrained language models.

The pipeline stages are submodules (``fisher``, ``directions``, ``surface``, ``schedule`` ...);
import them explicitly, e.g. ``from landscape import fisher``.
"""

__version__ = "0.1.0"
