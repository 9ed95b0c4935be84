"""Peak memory of a block of Python code on the CPU: what tests/test_plan.py and bench/train.py check the
memory planner (fasttune.plan) against. A measuring harness, not part of the pipeline."""

from __future__ import annotations

import ctypes
import threading
import time

import torch


class PeakMemory:
    """Peak bytes the process allocates while the block runs, over what it held before: the CPU
    counterpart of torch.cuda.max_memory_allocated, used to check the plan.

    Counts live malloc bytes (glibc mallinfo2: in use in the arenas plus mmapped blocks), sampled every
    few milliseconds, and adds `mapped` bytes of weights read straight from a memory-mapped file
    (safetensors), which malloc never sees. RSS would also count freed-but-cached heap and file pages.
    """

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    def __init__(self, every_s: float = 0.003):
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = self._MallInfo2
        self.every_s = every_s
        self.mapped = 0

    def live(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        self.start = self.peak_live = self.live()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_live = max(self.peak_live, self.live())
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_live = max(self.peak_live, self.live())

    @property
    def peak(self) -> int:
        return self.peak_live - self.start + self.mapped


def file_mapped_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors that live in a memory-mapped file rather than in the heap."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(n for ptr, n in storages.items() if any(lo <= ptr < hi for lo, hi in ranges))
