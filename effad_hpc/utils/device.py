"""Device choice, the build's GPU architectures, and the precision per GPU generation.

``run.precision: auto`` computes in bfloat16 only where the GPU has it natively (compute
capability 8.0 and up: A100, H100, ...), in float16 with loss scaling below that (V100, T4), and in
float32 on the CPU. ``torch.cuda.is_bf16_supported()`` is not used for the choice: it also
answers True on a V100, where bfloat16 is emulated and slow, and the fp16 loss scaler would never
run. The decisions are plain functions of the capability, so they are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch

from effad_hpc.config import Precision
from effad_hpc.errors import ConfigError

Capability = tuple[int, int]

NATIVE_BF16 = (8, 0)
V100_INSTALL = "pip install -c constraints.txt -c constraints-cu126.txt " \
               "--extra-index-url https://download.pytorch.org/whl/cu126 -e '.[test]'"
"""The README's install for GPUs older than Turing (V100: 7.0), whose kernels only PyTorch's CUDA
12.6 builds still ship."""

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto", precision: Precision = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible; ``cuda`` without a GPU is an error.

    On CUDA the build's architectures are checked against the GPU, and the precision against what
    the GPU runs, before any work starts (a wrong build would fail at the first kernel with "no
    kernel image is available")."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} was asked for, but torch sees no CUDA device (use auto or cpu)")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        check_build_architectures(torch.cuda.get_device_name(device), capability_of(device),
                                  torch.cuda.get_arch_list())
        # every stage feeds fixed sizes: let cuDNN time its algorithms once per shape and keep the fastest
        torch.backends.cudnn.benchmark = True
    compute_dtype(device, precision)
    return device


def capability_of(device: torch.device) -> Capability | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def build_runs_on(capability: Capability, architectures: list[str]) -> bool:
    """Whether a build compiled for ``architectures`` (``sm_80``, ``compute_90``, ...) has kernels
    for a GPU of ``capability``: a cubin ``sm_XY`` runs on capability X.Z for Z >= Y (same major),
    PTX ``compute_XY`` is compiled by the driver for any capability >= X.Y."""
    for arch in architectures:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def check_build_architectures(gpu: str, capability: Capability, architectures: list[str]) -> None:
    if not architectures or build_runs_on(capability, architectures):
        return  # an empty list: a source build that does not report its architectures
    raise ConfigError(f"GPU {gpu!r} (compute capability {capability[0]}.{capability[1]}) has no kernels in this "
                      f"torch {torch.__version__} build (built for {', '.join(architectures)}); install a build "
                      f"for it: {V100_INSTALL}")


def precision_dtype(precision: Precision, capability: Capability | None, gpu: str = "the GPU") -> torch.dtype:
    """The dtype autocast computes in (float32: no autocast) for ``precision`` on a device of
    ``capability`` (None: the CPU). A precision the device cannot run is a :class:`ConfigError`."""
    if capability is None:
        if precision in ("auto", "fp32"):
            return torch.float32
        raise ConfigError(f"run.precision: {precision} needs a CUDA device; the CPU computes in float32 "
                          "(use auto or fp32)")
    if precision == "auto":
        return torch.bfloat16 if capability >= NATIVE_BF16 else torch.float16
    if precision == "bf16" and capability < NATIVE_BF16:
        raise ConfigError(f"run.precision: bf16 needs compute capability 8.0 or newer, and {gpu} has "
                          f"{capability[0]}.{capability[1]} (use auto, which picks fp16 with loss scaling)")
    return _DTYPES[precision]


@functools.cache
def compute_dtype(device: torch.device, precision: Precision) -> torch.dtype:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    return precision_dtype(precision, capability_of(device), gpu)


def autocast(device: torch.device, precision: Precision = "auto") -> contextlib.AbstractContextManager:
    """Autocast in the run's precision on GPU; full precision (no autocast) where that is float32.

    The CPU keeps float32 because CPU autocast is slower than float32 on most machines and the
    features must match an uncompressed forward pass. Models cast their outputs to float32 before
    differences and squares (the anomaly maps), and the flow teacher disables autocast."""
    dtype = compute_dtype(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def random_state_kept() -> contextlib.AbstractContextManager:
    """Run a block with the global random state forked (CPU, and the CUDA device where CUDA is in
    use): what the block draws leaves a training's next dropout masks as they were."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else [])


def grad_scaler(device: torch.device, precision: Precision = "auto") -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast (small gradients underflow in float16); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=compute_dtype(device, precision) == torch.float16)


def device_record(device: torch.device, precision: Precision = "auto") -> dict:
    """What a result was computed on, for metrics.json, benchmarks and the leaderboard: CPU and
    GPU timings (or fp16 and fp32 numbers) must never be compared unknowingly."""
    record = {"precision": str(compute_dtype(device, precision)).removeprefix("torch."),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        capability = capability_of(device)
        record |= {"device_name": torch.cuda.get_device_name(device),
                   "compute_capability": f"{capability[0]}.{capability[1]}"}
    else:
        record |= {"device_name": _cpu_name(), "compute_capability": None}
    return record


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
