"""The compute dtype of a run: does the device compute bf16 natively (CUDA's answer, or the CPU's
flags and a timed probe), the dtype a config's ``train.dtype`` resolves to there and why, and the
workers' agreement on it."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _matmul_seconds(dtype, n: int = 512, reps: int = 5) -> float:
    """Best of ``reps`` times of an (n x 2n) @ (2n x 2n) matmul: the best time filters out other
    processes' bursts on a shared machine."""
    a, b = torch.randn(n, 2 * n).to(dtype), torch.randn(2 * n, 2 * n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Does ``device`` compute bf16 matmuls natively (fast), and why we think so.

    CUDA: the device's own answer (emulated bf16 on pre-Ampere GPUs counts as no). CPU: oneDNN must
    support bf16 at all (``torch.ops.mkldnn._is_mkldnn_bf16_supported``, true on any AVX-512 core,
    where bf16 may still be emulated); the CPU's avx512_bf16 / amx_bf16 flags then say native, and
    without them a timed probe decides: bf16 must beat fp32 by 1.5x
    on a 512 x 1024 x 1024 matmul (native AVX512-BF16 / AMX: 3-6x; emulated: slower than fp32;
    AVX2 only: ~100x slower, never timed)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"cuda {torch.cuda.get_device_name(device)}: bf16 {'native' if ok else 'not native'}"
    cap = torch.backends.cpu.get_cpu_capability()
    flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False, f"cpu {cap}, flags {flags or 'no bf16 flags'}: oneDNN has no bf16 kernels here"
    if flags:  # the instructions themselves: a timed probe on a loaded machine measured 1.5x here
        return True, f"cpu {cap}, flags {flags}: native bf16 instructions, oneDNN bf16 kernels"
    f32, b16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    ok = f32 / b16 >= 1.5
    return ok, (f"cpu {cap}, flags {flags or 'no bf16 flags'}: bf16 matmul {f32 / b16:.1f}x fp32 "
                f"({'>=' if ok else '<'} 1.5x)")


def resolve_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, dict]:
    """The compute dtype of a run and the record of why (for the log and the metadata)."""
    if requested == "float32":
        return torch.float32, {"compute": "float32", "requested": requested, "reason": "configured"}
    native, why = native_bf16(device)
    if requested == "bfloat16":
        reason = "configured" + ("" if native else f"; WARNING bf16 is not native here, expect a slow run ({why})")
        return torch.bfloat16, {"compute": "bfloat16", "requested": requested, "reason": reason, "probe": why}
    dtype = torch.bfloat16 if native else torch.float32
    return dtype, {"compute": str(dtype).replace("torch.", ""), "requested": requested,
                   "reason": f"auto: {why}", "probe": why}


def agree_across_workers(compute_dtype: torch.dtype, dtype_info: dict) -> torch.dtype:
    """Every worker probes its own device (a timed probe on a loaded machine can differ): bf16 only
    if all agree, or the ranks' collectives would disagree on sizes and hang/abort. Call on every
    rank of an initialised process group; updates ``dtype_info`` when this rank falls back."""
    import torch.distributed as dist

    votes = torch.tensor([1 if compute_dtype == torch.bfloat16 else 0], dtype=torch.int32)
    dist.all_reduce(votes, op=dist.ReduceOp.MIN)
    if compute_dtype == torch.bfloat16 and not votes.item():
        compute_dtype = torch.float32
        dtype_info.update(compute="float32", reason=dtype_info["reason"] + "; another worker's "
                          "probe found no native bf16, so every worker computes in fp32")
    return compute_dtype
