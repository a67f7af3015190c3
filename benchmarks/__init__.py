"""Benchmarks of jaxattn's attention variants (see docs/benchmarks.md)."""
