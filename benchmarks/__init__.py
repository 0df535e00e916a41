"""Benchmarks for jaxbn: ratios against Flax and PyTorch measured in one run.

Run ``python -m benchmarks`` (``--quick`` for tiny sizes, ``--only bn,cnn``
for some sections, ``--write-results`` for ``benchmarks/RESULTS.md`` and the
plot). The package itself imports neither JAX nor PyTorch so that the
PyTorch worker process stays free of JAX.
"""
