"""The device check (issue 20 item 6): ``python benchmarks/gpu/check.py``."""
