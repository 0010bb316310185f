"""What every benchmark prints first: the CPU it ran on (figures from different machines are
never compared)."""

import os
import re
from pathlib import Path


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    return f"{name.group(1) if name else '?'}, {os.cpu_count()} cores, flags {' '.join(keep)}"
