"""The CPU attention kernel of small items over the KV pool (`cpu_attention.cpp`): built once per
machine, loaded on demand, and the rule for when the ragged forward uses it.

`kernel()` compiles the C++ source with PyTorch's extension builder (g++ and ninja) into the
coralline cache (`ext/cpu_attention-<key>/`, the key hashing the source, the flags, torch's
version and the CPU's model and flags), the first time any process asks, and loads it. It returns
None, with one warning saying why, where it cannot be built (no compiler, no ninja) or when
`CORALLINE_CPU_ATTENTION=0`: the ragged forward then runs PyTorch's SDPA, as before. The build
takes ~45 s on the 2-core machine here; `make install` runs it (`python -m
coralline.batching.cpu_attention`), so servers and tests find it built. Concurrent builders wait
on the build folder's lock.

`usable(*tensors)`: the kernel serves CPU float32 pools. forward._SharedAttention uses it for
items of at most KERNEL_MAX_NODES tokens (decode steps and tiny trees), where it measured faster
than SDPA (SmolLM2 here: a 16-session decode forward 97 -> 82 ms); larger trees keep SDPA, whose
GEMMs win there (4 sessions of 16 nodes: SDPA ~1.7x faster on the attention alone).

Knows nothing about models, sessions or scheduling.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
KERNEL_MAX_NODES = 4  # the largest item (tokens) the kernel attends for (above: SDPA)
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" once loaded, "error" once it failed


def _cpu_signature() -> str:
    """The CPU's model and feature flags (the build uses -march=native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [
        line for line in text.splitlines() if line.startswith(("model name", "flags", "vendor_id"))
    ]
    return "\n".join(dict.fromkeys(keep))


def _flags() -> list[str]:
    return ["-O3", "-march=native", "-fopenmp", "-std=c++17"]


def build_dir() -> Path:
    from coralline.models import cache_dir

    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(), " ".join(_flags()), torch.__version__, _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    return cache_dir() / "ext" / f"cpu_attention-{key}"


def disabled() -> str | None:
    """Why the kernel is switched off by the environment (None: it is not)."""
    if os.environ.get("CORALLINE_CPU_ATTENTION", "1").strip().lower() in ("0", "false", "no"):
        return "CORALLINE_CPU_ATTENTION=0"
    return None


def kernel():
    """The loaded extension (with .pooled_attention), or None where it cannot be had."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        if "error" in _state:
            return None
        why = disabled()
        if why is not None:
            _state["error"] = why
            return None
        try:
            module = _build()
        except Exception as exc:  # no compiler, no ninja, a failed compile: SDPA serves
            _state["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
            log.warning(
                "the CPU attention kernel is unavailable (%s); attention runs on PyTorch's SDPA",
                _state["error"],
            )
            return None
        _state["module"] = module
        return module


def error() -> str | None:
    """Why kernel() returned None (None: it did not, or was not asked yet)."""
    return _state.get("error")  # type: ignore[return-value]


def _build():
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    built = any(folder.glob("*.so"))
    t0 = time.perf_counter()
    if not built:
        log.warning("building the CPU attention kernel into %s (once, ~1 min)", folder)
    module = load(
        name=f"coralline_cpu_attention_{folder.name.split('-')[-1]}",
        sources=[str(SOURCE)],
        extra_cflags=_flags(),
        build_directory=str(folder),
        verbose=False,
    )
    if not built:
        log.warning("built the CPU attention kernel in %.0f s", time.perf_counter() - t0)
    return module


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors (all CPU float32) and is available."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and kernel() is not None
    )


def main() -> int:
    """Build (or find) the kernel; exit 0 either way, saying which (the fallback is SDPA)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    module = kernel()
    if module is None:
        print(f"CPU attention kernel: unavailable ({error()}); attention runs on SDPA")
    else:
        print(f"CPU attention kernel: ready in {build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
