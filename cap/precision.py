"""trainer.precision: the number format a run computes in, decided once from what the hardware runs natively.

`auto` (the default) is bf16 where the device has native bf16 arithmetic (a CUDA GPU that supports it; a CPU with
AMX-BF16 or AVX512-BF16), else fp32. bf16 means autocast for the forward and backward passes (training, evaluation,
bank encoding, importance, the teacher) over fp32 master weights and optimizer state; the losses, the banks'
similarities and the contrastive normalisation stay fp32 (spec Q21), as do masks and scores.
"""
from __future__ import annotations

import contextlib
import logging

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
log = logging.getLogger(__name__)


def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions ("AMX-BF16", "AVX512-BF16"), or None. Decided by capability, as torch's
    own kernels decide, never by the processor's name."""
    cpu = getattr(torch, "cpu", None)
    try:
        if cpu._is_amx_tile_supported():
            return "AMX-BF16"
        if cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
    except AttributeError:  # an older torch: read the kernel's flags
        flags = cpu_flags()
        if "amx_bf16" in flags:
            return "AMX-BF16"
        if "avx512_bf16" in flags:
            return "AVX512-BF16"
    return None


def cpu_flags() -> set[str]:
    """The CPU flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The processor's model name, for benchmark records."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> str | None:
    """Why `device` runs bf16 natively ("CUDA GPU with bf16", "CPU with AVX512-BF16"), or None when it does not."""
    if device.type == "cuda":
        return "CUDA GPU with bf16" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        found = cpu_bf16()
        return f"CPU with {found}" if found else None
    return None


def resolve(precision: str, device: torch.device) -> tuple[str, str]:
    """(the precision a run uses, why): `auto` becomes bf16 or fp32 by `native_bf16`; the others stay as asked."""
    if precision != "auto":
        return precision, "asked for"
    reason = native_bf16(device)
    if reason:
        return "bf16", reason
    return "fp32", f"no native bf16 on this {device.type.upper() if device.type == 'cuda' else 'CPU'}"


def resolve_config(cfg) -> None:
    """Replace `trainer.precision=auto` in `cfg` by what this machine resolves it to, and say so once."""
    if cfg.trainer.precision != "auto":
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg.trainer.precision, reason = resolve("auto", device)
    message = f"trainer.precision=auto: {cfg.trainer.precision} ({reason})"
    print(message)
    log.info(message)


def autocast(device: torch.device | str, precision: str):
    """The autocast context of `precision` on `device` (a null context for fp32)."""
    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def full_precision(device: torch.device | str):
    """A region that computes in fp32 even inside an autocast one (the losses and bank similarities, spec Q21)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
