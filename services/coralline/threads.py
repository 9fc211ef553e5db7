"""OpenMP threads per native thread: one thread computes with N, the others with one.

PyTorch's Linux wheels run their parallel CPU kernels on GNU OpenMP (libgomp). libgomp keeps a
team of worker threads for every native thread that ever ran a parallel region, and while it
manages more threads than the process has CPUs its workers stop spinning between regions (100
spins, then a futex sleep; see GOMP_SPINCOUNT in the libgomp manual). A target forward is
hundreds of small parallel regions, and each then pays a wake-up. Measured on the 2-core AMD
EPYC here (2026-12-02), a SmolLM2 one-token forward on 2 threads: 28-31 ms when one thread runs
every parallel region, 45-50 ms once a second thread has run one too (the serving threads'
sampling ops, the main thread's model loading). A server that batches its forwards on one
thread (batching/scheduler.py) therefore keeps every other thread at one OpenMP thread (no
team): `one_thread_here()`, called first thing in those threads (a thread pool's
`initializer`) and in the main thread before it loads anything; work that needs the full
count runs on the scheduler's thread (`BatchScheduler.call`) or on a thread of its own that
ends with it (`on_own_thread`). `coralline bench load`, engine-plain at 1 / 4 / 16 sessions:
18.2 / 48.2 / 99.2 tok/s before, 26.5 / 64.9 / 132.8 after.

Only the calling thread's setting changes: torch's process-wide count
(`torch.get_num_threads()` in a new thread) stays what `torch.set_num_threads` made it. Where
libgomp is not loaded (another OpenMP runtime, or none) nothing is done.

Knows nothing about models or serving.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

R = TypeVar("R")


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (the same copy: dlopen of a loaded path returns its handle)."""
    import torch  # noqa: F401  (loads torch's libgomp)

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libgomp" in path:
                    return ctypes.CDLL(path)
    except OSError:  # not Linux
        return None
    return None


def one_thread_here() -> bool:
    """Run the calling thread's torch CPU ops on one OpenMP thread; -> whether it could."""
    import torch

    torch.get_num_threads()  # torch's lazy per-thread init first: it would undo ours later
    lib = _libgomp()
    if lib is None:
        return False
    lib.omp_set_num_threads(1)
    return True


def on_own_thread(fn: Callable[[], R]) -> R:
    """fn() on a fresh thread with torch's full thread count; -> its result (or raise its
    exception). The thread's OpenMP team ends with it (the pool's shutdown joins it), so a
    caller that keeps one thread (`one_thread_here`) can still run a multi-threaded job
    without leaving a team behind."""
    with ThreadPoolExecutor(1, thread_name_prefix="compute") as pool:
        return pool.submit(fn).result()
