"""The run-time micro-batch runner: runs a phase over its rows in micro-batches and halves them on out-of-memory.

Why not accelerate's `find_executable_batch_size`: it restarts the whole decorated function with a smaller batch,
so the rows that already succeeded would run again (generating them twice, or accumulating their gradients twice).
Our runner redoes only the slice that failed and keeps the halved size for the rest of the run. Detecting an OOM and
freeing memory afterwards are accelerate's (`should_reduce_batch_size`, `clear_device_cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

__all__ = ["MicroBatchOOMError", "MicroBatchRunner", "is_out_of_memory"]


class MicroBatchOOMError(RuntimeError):
    """A phase ran out of memory at micro-batch 1: halving cannot help any more."""


def is_out_of_memory(err: BaseException) -> bool:
    """An allocator failure that a smaller micro-batch may avoid.

    accelerate matches messages ending in "out of memory." (the caching allocator's), MPS/CPU/HPU allocators and
    cuDNN's not-supported error; it misses the CUDA runtime's own "CUDA error: out of memory" (no period, raised by
    kernels that allocate), and an OutOfMemoryError raised with another message, so those are checked here too.
    """
    return (isinstance(err, torch.OutOfMemoryError) or should_reduce_batch_size(err)
            or (isinstance(err, RuntimeError) and "out of memory" in str(err)))


class MicroBatchRunner:
    """Runs ``fn(start, end)`` over ``[0, n_items)`` in micro-batches, halving on OOM.

    On an out-of-memory error the runner leaves the ``except`` block (the traceback pins the
    failed step's tensors), collects garbage and empties the device cache, halves
    ``micro_batch`` and redoes the same items from ``start``. The halved size is kept for the
    rest of this runner's life.

    Contract for ``fn``: it must not mutate state (gradients, optimizer, buffers, RNG
    consumers whose results are kept) until it returns, because a failed call is simply
    redone. Then on success ``fn`` has been called exactly once per item. Callers that
    accumulate gradients scale each micro-batch loss by ``(end - start) / n_items``, so the
    accumulated gradient is the same weighted mean whatever the micro-batch size; a backward
    that can OOM halfway should write into a snapshot-able place (e.g. ``torch.autograd.grad``
    then add into ``.grad`` on success).

    ``inject_oom_above`` is a test hook: slices larger than it raise ``torch.OutOfMemoryError``
    before ``fn`` is called, so recovery can be exercised on CPU.
    """

    def __init__(self, phase: str, micro_batch: int, inject_oom_above: int | None = None):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.phase = phase
        self.micro_batch = int(micro_batch)
        self.inject_oom_above = inject_oom_above
        self.oom_events: list[dict[str, Any]] = []
        self.calls = 0  # run() calls so far: an OOM event records which call and item it struck

    def _call(self, fn: Callable[[int, int], Any], start: int, end: int) -> Any:
        if self.inject_oom_above is not None and end - start > self.inject_oom_above:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected: {end - start} > {self.inject_oom_above} items in phase {self.phase!r})")
        return fn(start, end)

    def run(self, n_items: int, fn: Callable[[int, int], Any]) -> list[Any]:
        results: list[Any] = []
        start = 0
        self.calls += 1
        while start < n_items:
            end = min(start + self.micro_batch, n_items)
            failed = False
            try:
                result = self._call(fn, start, end)
            except RuntimeError as err:  # torch.OutOfMemoryError subclasses RuntimeError
                if not is_out_of_memory(err):
                    raise
                failed = True  # only a flag leaves this block: `err` and its frames die here
            if failed:
                self._recover(start, end)
                continue
            results.append(result)
            start = end
        return results

    def _recover(self, start: int, end: int) -> None:
        clear_device_cache(garbage_collection=True)
        size = min(self.micro_batch, end - start)  # the slice that failed (the last may be short)
        if size == 1:
            raise MicroBatchOOMError(
                f"phase {self.phase!r} ran out of memory at micro-batch 1 (items [{start}, {end})); "
                f"shorten the sequences, enable gradient checkpointing or 4-bit quantization, or free GPU memory"
            )
        new = size // 2
        # `call` and `start` tell whether the micro-batches run before the OOM had another size than those after it
        self.oom_events.append({"phase": self.phase, "from": self.micro_batch, "to": new, "call": self.calls,
                                "start": start})
        self.micro_batch = new
