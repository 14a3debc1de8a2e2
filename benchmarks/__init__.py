"""The benchmark harness (``python benchmarks/compare.py --help``); not part of the package."""
