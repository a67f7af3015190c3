"""jaxattn: transformer attention from first principles, in JAX and Flax.

``from jaxattn import functional, nn``: pure JAX kernels, caches and layers
(``jaxattn.functional``) and the Flax NNX modules built on them (``jaxattn.nn``).
``jaxattn.lm`` holds what a language model needs around the network.
"""

from jaxattn import functional, nn

__version__ = "0.3.0"

__all__ = ["functional", "nn", "__version__"]
