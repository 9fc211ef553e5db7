"""`init_ray`: Ray's start-up is tried again when the local node misses Ray's fixed 30 s wait,
and what the failed attempt started is killed first. The start-up timeout cannot be provoked
on purpose, so `init` stands in for `ray.init` here: each call starts a real child process (as
ray.init starts the GCS and the raylet) and then fails or returns; the stack's real Ray start
is covered by the stack and router-bench tests."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from coralline.router.stack import RAY_START_ATTEMPTS, init_ray

TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


class FlakyInit:
    """Starts one child per call; raises `errors[i]` on call i (None: returns)."""

    def __init__(self, errors: list[Exception | None]):
        self.errors, self.children, self.kwargs = errors, [], []

    def __call__(self, **kwargs) -> None:
        self.kwargs.append(kwargs)
        self.children.append(_sleeper())
        err = self.errors[len(self.kwargs) - 1]
        if err is not None:
            raise err


def _alive(p: subprocess.Popen) -> bool:
    return psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE


def test_a_start_up_timeout_is_retried_after_killing_what_the_attempt_started():
    older = _sleeper()  # a worker started before Ray (the stack's drafters): left alone
    init = FlakyInit([Exception(TIMEOUT), None])
    try:
        init_ray(init=init, num_cpus=2, namespace="coralline")
        assert len(init.kwargs) == 2
        assert init.kwargs[0] == init.kwargs[1] == {"num_cpus": 2, "namespace": "coralline"}
        assert not _alive(init.children[0])  # the failed attempt's processes are gone
        assert _alive(init.children[1]) and _alive(older)  # the good one's and older ones stay
    finally:
        for p in [older, *init.children]:
            p.kill()
            p.wait()


def test_the_last_timeout_and_any_other_error_are_raised():
    init = FlakyInit([Exception(TIMEOUT)] * RAY_START_ATTEMPTS)
    try:
        with pytest.raises(Exception, match="timed out during startup"):
            init_ray(init=init)
        assert len(init.kwargs) == RAY_START_ATTEMPTS
        assert not any(_alive(p) for p in init.children[:-1])
    finally:
        for p in init.children:
            p.kill()
            p.wait()

    other = FlakyInit([RuntimeError("bad num_cpus"), None])
    try:
        with pytest.raises(RuntimeError, match="bad num_cpus"):
            init_ray(init=other, num_cpus=-1)
        assert len(other.kwargs) == 1  # not a start-up timeout: no second try
    finally:
        for p in other.children:
            p.kill()
            p.wait()
