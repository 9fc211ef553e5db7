"""A `coralline` child armed with die_with_parent() dies when the process that started it is
SIGKILLed (no orphan servers), and exits at once if that process is already gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from coralline.rpc.process import DIE_WITH_PARENT

CHILD = (
    "import time; from coralline.rpc.process import die_with_parent; die_with_parent(); "
    "print('armed', flush=True); time.sleep(60)"
)
PARENT = (
    "import os, subprocess, sys; from coralline.rpc.process import die_with_parent_env; "
    f"p = subprocess.Popen([sys.executable, '-c', {CHILD!r}], "
    "env=dict(os.environ, **die_with_parent_env()), stdout=subprocess.PIPE, text=True); "
    "print(p.pid, p.stdout.readline().strip(), flush=True); p.wait()"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


def test_child_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    pid, state = parent.stdout.readline().split()
    assert state == "armed"
    child = int(pid)
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its SIGKILLed parent"


def test_child_of_a_parent_already_gone_exits():
    env = dict(os.environ, **{DIE_WITH_PARENT: "1"})  # pid 1 is not our parent
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, timeout=30)
    assert out.returncode == 1 and b"armed" not in out.stdout
