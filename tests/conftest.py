"""Shared test set-up.

Triton only runs on CPU through its interpreter, which must be switched on before triton is
imported anywhere, so it is set here, at collection start, when no GPU is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
