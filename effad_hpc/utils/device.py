"""Device choice and mixed precision: CUDA when present, else the CPU."""

from __future__ import annotations

import contextlib

import torch

from effad_hpc.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} was asked for, but torch sees no CUDA device (use auto or cpu)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on GPU (bf16 where supported, else fp16); full precision on the CPU.

    The CPU keeps float32 because CPU autocast is slower than float32 on most machines and the
    features must match an uncompressed forward pass.
    """
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast (e.g. V100, which has no bfloat16); a no-op otherwise."""
    float16 = device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=float16)
