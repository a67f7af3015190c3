"""Benchmarks of jaxattn's attention variants (see README, "Benchmarks")."""
