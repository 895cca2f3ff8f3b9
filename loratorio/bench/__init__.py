"""Benchmarks a user can run (`python -m loratorio.bench <command>`): speed, miniature quality, miniature training."""
