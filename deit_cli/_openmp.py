"""How long torch's OpenMP threads spin, set before torch is imported (the CLI's start).

Between two parallel regions (about 90 per DeiT forward: each matmul, attention, layer
norm) libgomp's threads busy-wait for the next one, by default for 300,000 spins
(milliseconds). On a quiet machine that saves a wake-up; on a shared one the spinning
threads hold the cores that the thread they wait for needs, and a region's barrier waits
for a time slice: measured on a 2-core machine at load 5, deit-tiny-distilled batch 1
took 670-1045 ms per image with the default and 36 ms with 1,000 spins (ONNX Runtime, whose
thread pool lets the caller do the work itself: 64-127 ms); on the same machine quiet,
the two were within noise (19-20 ms). libgomp reads the setting once, when it is loaded,
so it cannot be changed later in the process. A user's own GOMP_SPINCOUNT or
OMP_WAIT_POLICY wins; DEIT_NO_OMP_TUNING=1 leaves libgomp's default.
`benchmarks/spin_count.py` measures the trade-off on a machine (docs/bench.md).
"""

from __future__ import annotations

import os
import sys

SPINCOUNT = "1000"


def tune_openmp_env() -> bool:
    """Set GOMP_SPINCOUNT for this process and its children, if nothing decided it yet;
    returns whether it did. Torch-free; a no-op once torch is imported."""
    if "torch" in sys.modules or os.environ.get("DEIT_NO_OMP_TUNING", "") not in ("", "0"):
        return False
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return True
