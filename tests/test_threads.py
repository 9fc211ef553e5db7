"""threads.py: a thread set to one OpenMP thread runs torch's parallel kernels without a team
of its own and leaves torch's process-wide count alone; `on_own_thread` hands back the result
or the exception; `BatchScheduler.call` runs work on the scheduler's thread."""

import os
import threading

import pytest
import torch

from coralline.batching.scheduler import BatchScheduler
from coralline.threads import _libgomp, on_own_thread, one_thread_here

from .tiny import tiny_llama


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _in_thread(fn):
    """fn() on a new thread that stays alive (its team with it) until the count is read."""
    out, ran, done = [], threading.Event(), threading.Event()

    def run() -> None:
        out.append(fn())
        ran.set()
        done.wait()

    thread = threading.Thread(target=run)
    thread.start()
    ran.wait()
    count = _os_threads()
    done.set()
    thread.join()
    return out[0], count


def test_one_thread_here_runs_parallel_kernels_without_a_team():
    assert _libgomp() is not None  # torch's Linux wheels bring libgomp: what this is about
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(4, 1 << 20)

        def parallel_op() -> int:
            torch.softmax(x, -1).sum()  # large enough for a parallel region
            return torch.get_num_threads()

        base = _os_threads()
        n, with_team = _in_thread(parallel_op)
        assert n == 2 and with_team >= base + 2  # the thread and its team's worker

        def single() -> int:
            assert one_thread_here()
            return parallel_op()

        n, alone = _in_thread(single)
        assert n == 1 and alone == base + 1  # the thread alone, no worker
        assert torch.get_num_threads() == 2  # torch's count for everyone else is unchanged
        assert _in_thread(parallel_op)[0] == 2  # nor for a new thread
    finally:
        torch.set_num_threads(before)


def test_on_own_thread_returns_and_raises():
    main = threading.get_ident()
    assert on_own_thread(threading.get_ident) != main
    with pytest.raises(KeyError, match="boom"):
        on_own_thread(lambda: {}["boom"])


def test_scheduler_call_runs_on_the_scheduler_thread():
    sched = BatchScheduler(tiny_llama(40, seed=1, layers=1))
    assert sched.call(lambda: threading.current_thread().name) == "batch"
    with pytest.raises(ZeroDivisionError):
        sched.call(lambda: 1 / 0)
    assert sched.call(lambda: 7) == 7  # the thread survives a failed call
    sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        sched.call(lambda: 1)
