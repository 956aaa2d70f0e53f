"""Per-phase wall time and peak memory of a PPO step, measured by the trainer itself.

The trainer wraps each phase (generate, score, train) in `clock.phase(name)`; `lowrank-rlhf bench` and the metrics
read the same numbers, so nothing re-times what the trainer already times. On CUDA the device is synchronised at
each phase boundary (three syncs per step: nothing next to the thousands of kernel launches of a step) and the peak
counters are reset at each phase start, so a phase's peak is its own.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class PhaseMeasure:
    time_s: float
    allocated: int | None = None  # peak bytes allocated during the phase (CUDA only)
    reserved: int | None = None   # peak bytes reserved by the caching allocator (CUDA only)


@dataclass
class PhaseClock:
    device: torch.device
    current: str | None = None                       # the phase running now; hooks read it (bench's probe)
    last: dict[str, PhaseMeasure] = field(default_factory=dict)  # the latest measure of each phase

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.current, start = name, time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.current = None
            self.last[name] = PhaseMeasure(
                time_s=time.perf_counter() - start,
                allocated=int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None,
                reserved=int(torch.cuda.max_memory_reserved(self.device)) if self.cuda else None)

    def metrics(self) -> dict:
        """TRL-style names: time/<phase>_s."""
        return {f"time/{name}_s": m.time_s for name, m in self.last.items()}
