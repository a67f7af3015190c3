"""jaxattn: transformer attention from first principles, in JAX and Flax."""

__version__ = "0.1.0"
