"""Facts more than one layer needs, defined once."""

from __future__ import annotations

IGNORE_INDEX = -100
"""The label that keeps a token out of the loss (the prompt, padding): HF's and PyTorch's cross-entropy default."""
