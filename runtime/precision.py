"""Which floating-point precision a run computes in, and the autocast context that applies it.

``auto`` picks bf16 on CUDA GPUs with bf16 tensor cores (Ampere and newer), fp16 with loss scaling on older
GPUs (a T4), bf16 on CPUs that compute bf16 natively (AVX512-BF16 or AMX), and fp32 elsewhere: on other CPUs
bf16 is emulated and slower, and on Apple MPS autocast gains little at this size. Weights, optimizer state
and the EMA always stay in fp32; only the forward and backward passes run in the lower precision.
"""
from __future__ import annotations

import contextlib

import torch

from runtime.errors import UserError
from settings.config import PRECISIONS

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # fp32 runs without autocast


def choose_precision(requested: str, device: torch.device) -> str:
    """``requested`` itself, or for ``auto`` the precision this device runs fastest without losing quality."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "fp16" and device.type != "cuda" and not hasattr(torch.amp, "GradScaler"):
        raise UserError(f"--precision fp16 off a CUDA GPU needs torch 2.3 or newer, for its loss scaler (this is "
                        f"torch {torch.__version__}); pass --precision bf16 or fp32")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), which makes bf16 autocast pay on it."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def autocast(device: torch.device, precision: str, **kwargs) -> contextlib.AbstractContextManager:
    """torch.autocast for ``precision`` (one of fp32, fp16, bf16) on ``device``; a no-op for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, **kwargs)
