"""Device choice, thread settings, and random draws across devices."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from worldmodel.errors import UserError

if TYPE_CHECKING:
    import torch

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    import torch  # here, not at the top: importing torch costs ~2 s in every worker process

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("config system.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bfloat16 in hardware (AMX or AVX-512 BF16)?  Linux only; else False.

    Without it a bfloat16 product is emulated and slower than float32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device | str) -> torch.dtype | None:
    """``system.precision`` -> the dtype of the big matrix products, None for float32.

    ``auto``: bfloat16 where the hardware has it (a CUDA GPU that supports it, a CPU with
    AMX or AVX-512 BF16), else float32.  Only training's forward passes and the dream's
    matrix products use it; weights, optimiser state, losses and the real game stay float32.
    """
    import torch

    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise UserError(f"config system.precision: {name!r} is not one of auto, float32, bfloat16")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if kind == "cpu" and cpu_has_native_bf16() else None


def describe_compute(device_name: str, precision_name: str) -> str:
    """One line on what V, M and the dream will run on, for the training commands' header.

    On a CPU where ``auto`` falls back to float32, it says so and what that costs, so that a
    user on such a machine knows why the preset takes hours rather than minutes.
    """
    device = resolve_device(device_name)
    precision = resolve_precision(precision_name, device)
    where = f"{device.type}, {available_cores()} cores" if device.type == "cpu" else str(device)
    no_bf16 = "; this CPU has neither AMX nor AVX-512 BF16, so"
    if precision is not None:
        line = f"compute: {where}, bfloat16 matrix products (system.precision: {precision_name})"
        if device.type == "cpu" and not cpu_has_native_bf16():
            line += (f"{no_bf16} they are emulated and far slower than float32 (docs/benchmarks.md, "
                     "\"On a CPU without AVX-512\"): set it to auto")
        return line
    line = f"compute: {where}, float32 (system.precision: {precision_name})"
    if device.type == "cpu" and precision_name == "auto":  # auto fell back: the CPU has no bfloat16
        line += (f"{no_bf16} V, M and the dream take about 3.5-4 times as long as on one that has "
                 "(docs/results.md, \"Run z3a0\")")
    return line


def autocast(device: torch.device, precision: torch.dtype | None):
    """The training forward pass's context: autocast to ``precision`` (from
    :func:`resolve_precision`), or a no-op for float32 (None)."""
    import torch

    return torch.autocast(device.type, dtype=precision or torch.bfloat16, enabled=precision is not None)


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def single_thread() -> None:
    """Pin this process to one BLAS / torch thread.

    Worker processes that keep the default pools oversubscribe a small machine,
    and ViZDoom (whose engine busy-waits) then collapses (docs/benchmarks.md).
    """
    import torch

    for var in THREAD_ENV_VARS:
        os.environ[var] = "1"
    torch.set_num_threads(1)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
         normal: bool = False) -> torch.Tensor:
    """U(0, 1) (or N(0, 1)) draws from ``generator`` on its own device, moved to ``device``.

    The dream keeps its generator on the CPU whatever M's device, so a seed draws the same
    numbers everywhere.  ``generator`` None: torch's default generator of ``device``.
    """
    import torch

    where = generator.device if generator is not None else device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=where).to(device)
