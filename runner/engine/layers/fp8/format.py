"""The fp8 (e4m3fn) number format as the fp8 layers and their Triton kernel both use it."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INV_FP8_MAX = 1.0 / FP8_MAX  # scale = amax * (1 / 448): one IEEE multiply, the same in torch and Triton
MIN_SCALE = 1e-12  # an all-zero row gets this scale instead of 0 (no division by zero)
