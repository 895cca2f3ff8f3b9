"""Benchmarks: composition quality on the CPU miniature (`quality`), and training that miniature (`train`)."""
