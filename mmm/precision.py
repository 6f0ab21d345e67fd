"""Which compute precision a device runs fast: bf16 where the hardware has it, fp32 elsewhere.

A CUDA GPU with bf16 runs it on tensor cores. A CPU runs bf16 matmuls natively only with bf16
instructions (x86 ``avx512_bf16`` or AMX, Arm's ``bf16``): there they take about half of fp32's
time; without them torch emulates bf16 and it is slower than fp32 (docs/PERFORMANCE.md, "bf16 on
CPUs"). ``resolve_bf16`` turns a config's ``"auto" | True | False`` into a decision for one device.

    resolve_bf16("auto", "cpu")      # True on a Zen 4 or Sapphire Rapids core, False on older ones
"""

from __future__ import annotations

import functools
import platform

import torch

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags of native bf16 arithmetic: x86 AVX-512 BF16, x86 AMX, Arm's BF16 (FEAT_BF16)."""


def cpu_flags_have_bf16(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text names a native bf16 instruction set on its flag lines."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and CPU_BF16_FLAGS & set(value.split()):
            return True
    return False


@functools.cache
def cpu_has_bf16() -> bool:
    """This machine's CPU (Linux reads /proc/cpuinfo; elsewhere no claim is made: False)."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_flags_have_bf16(f.read())
    except OSError:
        return False


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 natively."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_has_bf16()


def check_bf16(setting: str | bool, what: str) -> None:
    """A config's ``bf16`` is ``auto``, true or false; anything else is an error naming ``what``."""
    if setting not in ("auto", True, False):
        raise ValueError(f"{what} must be auto, true or false, got {setting!r}")


def resolve_bf16(setting: str | bool, device: str | torch.device, what: str) -> bool:
    """A config's ``bf16`` for one device: ``auto`` is :func:`native_bf16`; ``True`` on a GPU
    without bf16 is an error naming ``what`` (a CPU emulates it: slow, but it runs)."""
    check_bf16(setting, what)
    if setting == "auto":
        return native_bf16(device)
    if setting and torch.device(device).type == "cuda" and not native_bf16(device):
        raise ValueError(f"{what}=true but this GPU has no bf16; use {what}=auto")
    return setting
