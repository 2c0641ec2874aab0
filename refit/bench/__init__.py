"""The benchmarks of ``refit bench``: one module each. Composition code: they may import any layer."""
