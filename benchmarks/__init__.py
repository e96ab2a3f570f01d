"""Benchmarks: the project's stages side by side with plain baselines, written as JSON + markdown tables.

    python -m benchmarks.run [--only NAME] [--quick]

One module per benchmark; ``benchmarks.run.BENCHMARKS`` is the registry (name -> function). Each function returns a
``BenchmarkResult`` (``benchmarks.common``); the runner adds machine information and writes
``benchmarks/results/<name>.json`` and ``benchmarks/results/summary.md``.
"""
