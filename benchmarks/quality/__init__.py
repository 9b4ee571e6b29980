"""Issue #7 quality benchmark: every selection method on three real models (see run.py)."""
