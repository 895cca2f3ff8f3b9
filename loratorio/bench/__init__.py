"""Benchmarks a user can run (`python -m loratorio.bench <command>`); never imported by the extension at run time."""
