"""The load bench's peers: vLLM's CPU build (its own venv) and HF `generate` with static batches.

Both return one shape, so `coralline bench load` can put them beside coralline:

    {"peer": str, "version": str, "threads": int, "speculative_config": dict | None,
     "points": [point, ...]}   # one point per concurrency level, see vllm_peer.point()

- `run_vllm` runs `vllm_peer.py` with the python of the peer venv (`make bench-peers` installs
  vLLM's CPU build there, never in the project venv: it pins its own torch/transformers) in a
  subprocess, and reads its JSON.
- `run_hf_batched` serves the same closed loop in this process with HF `generate`: c
  consecutive requests form one left-padded batch, the next batch starts when it has finished
  (static batching: no request joins a running batch, unlike vLLM's continuous batching).

Every request makes exactly max_new_tokens tokens, greedily: EOS neither stops nor is masked
(vLLM's ignore_eos), so the outputs of all peers can be compared with HF greedy token for token.
Knows nothing of coralline's engine or services; figures come only from the run that asks.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from coralline.bench.vllm_peer import Request, num_requests, point

REPO = Path(__file__).resolve().parents[3]  # services/coralline/bench/peers.py -> the repo
SCRIPT = Path(__file__).with_name("vllm_peer.py")


def peer_venv() -> Path:
    """The vLLM peer's venv: $CORALLINE_PEERS_DIR/vllm (relative to the repo), else
    <repo>/.peers/vllm; read at each call."""
    root = Path(os.environ.get("CORALLINE_PEERS_DIR") or ".peers").expanduser()
    return (root if root.is_absolute() else REPO / root) / "vllm"


PEER_VENV = peer_venv()  # the default when this module was imported


def vllm_python() -> Path | None:
    """The peer venv's python when vLLM is installed in it, else None (a file check: importing
    vllm to be sure takes ~10 s)."""
    venv = peer_venv()
    python = venv / "bin" / "python"
    if not python.exists() or not any(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        return None
    return python


def install_hint() -> str:
    return (
        f"the vLLM peer is not installed in {peer_venv()}: run `make bench-peers` "
        "(vLLM's CPU build in its own venv, ~600 MB download, a few minutes)"
    )


def _bind(threads: int) -> str:
    return "0" if threads == 1 else f"0-{threads - 1}"  # cores 0..threads-1


def run_vllm(
    model_folder: str | os.PathLike,
    prompts: list[list[int]],
    concurrency: list[int],
    max_new_tokens: int,
    ngram: bool,
    threads: int = 2,
    timeout_s: float = 3600,
) -> dict:
    """vLLM (CPU build, fp32, eager, no prefix caching) under closed-loop load at each
    concurrency; n-gram speculation (5 tokens, lookup 2..5) when `ngram`. prompts: [n][len]
    chat-templated ids. Progress lines go to stderr; RuntimeError with the tail of vLLM's
    stderr when it fails or runs past timeout_s."""
    python = vllm_python()
    if python is None:
        raise RuntimeError(install_hint())
    if not prompts or threads < 1 or not concurrency:
        raise ValueError("run_vllm needs prompts, concurrency levels and threads >= 1")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="2",  # GiB of KV cache
        VLLM_CPU_OMP_THREADS_BIND=_bind(threads),  # the default binding gives 1 thread on 2 cores
        VLLM_LOGGING_LEVEL=env.get("VLLM_LOGGING_LEVEL", "WARNING"),
        PYTHONUNBUFFERED="1",
    )
    with tempfile.TemporaryDirectory(prefix="coralline-vllm-") as tmp:
        prompts_file, out_file = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        prompts_file.write_text(json.dumps([[int(t) for t in p] for p in prompts]))
        cmd = [
            str(python),
            str(SCRIPT),
            "--model",
            str(Path(model_folder).resolve()),
            "--prompts",
            str(prompts_file),
            "--concurrency",
            ",".join(str(int(c)) for c in concurrency),
            "--max-new-tokens",
            str(int(max_new_tokens)),
            "--threads",
            str(int(threads)),
            "--out",
            str(out_file),
            *(["--ngram"] if ngram else []),
        ]
        tail: collections.deque[str] = collections.deque(maxlen=60)
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a timeout ends the engine core too
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if line.startswith("vllm_peer:"):  # our progress lines, not vLLM's logs
                    print(line, end="", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        except BaseException:  # Ctrl-C or an error here: vLLM's engine core must not outlive us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        reader.join(timeout=10)
        if rc != 0 or not out_file.exists():
            why = f"ran past {timeout_s:.0f} s" if rc is None else f"exited with {rc}"
            raise RuntimeError(
                f"the vLLM peer {why}: {' '.join(cmd)}\n--- last lines of its output ---\n"
                + "\n".join(tail)
            )
        return json.loads(out_file.read_text())


class _StepClock:
    """A logits processor that records when each decoding step's logits are ready: step k's
    time is when token k of every row is known (the argmax follows at once)."""

    def __init__(self) -> None:
        self.times: list[float] = []  # [steps] perf_counter seconds

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores  # [rows, V] unchanged


def _generate_batch(
    model, batch: Sequence[list[int]], max_new_tokens: int, pad: int, clock: _StepClock | None
) -> list[list[int]]:
    """Greedy ids of a left-padded batch, exactly max_new_tokens per row (EOS does not stop)."""
    from transformers import LogitsProcessorList

    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [rows, width]
    att = torch.zeros((len(batch), width), dtype=torch.long)  # [rows, width] 1 = real token
    for r, p in enumerate(batch):
        ids[r, width - len(p) :] = torch.tensor(p)
        att[r, width - len(p) :] = 1
    config = copy.deepcopy(model.generation_config)
    # vLLM's ignore_eos: EOS neither stops nor is masked (min_new_tokens would mask it, and
    # None would be filled back in from model.generation_config: [] means "no EOS")
    config.eos_token_id = []
    config.pad_token_id = pad
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.max_length = None
    config.temperature = config.top_p = config.top_k = None  # greedy: no sampling flags
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=att.to(model.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([clock] if clock is not None else []),
        )  # [rows, width + max_new_tokens]
    return out[:, width:].tolist()


def run_hf_batched(
    model, prompts: list[list[int]], concurrency: list[int], max_new_tokens: int
) -> dict:
    """HF `generate` greedy under the same closed loop: for each c, max(len(prompts), c)
    requests (request i = prompt i % len) in consecutive batches of c, left-padded, one after
    the other. Every row of a batch starts with the batch and gets one token per step, so each
    row's inter-token latency is the step time and its TTFT the prefill + first step. Uses this
    process's torch threads. prompts: [n][len] token ids."""
    import transformers

    if not prompts or not concurrency or min(concurrency) < 1:
        raise ValueError("run_hf_batched needs prompts and positive concurrency levels")
    eos = model.generation_config.eos_token_id
    eos_list = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = min(eos_list) if eos_list else 0  # masked out: any id would do
    _generate_batch(model, [prompts[0]], min(8, max_new_tokens), pad, None)  # warm-up
    points = []
    for c in concurrency:
        total = num_requests(len(prompts), c)
        print(f"hf_batched: concurrency {c}: {total} requests...", file=sys.stderr, flush=True)
        done: list[Request] = []
        t0 = time.perf_counter()
        for b in range(0, total, c):
            idx = list(range(b, min(b + c, total)))
            clock = _StepClock()
            start = time.perf_counter()
            rows = _generate_batch(
                model, [prompts[i % len(prompts)] for i in idx], max_new_tokens, pad, clock
            )
            times = clock.times[:max_new_tokens]  # [max_new_tokens] one step per token
            for i, row in zip(idx, rows, strict=True):
                done.append(Request(index=i, start=start, token_ids=row, token_times=list(times)))
        wall = time.perf_counter() - t0
        points.append(point(c, done, wall, len(prompts)))
    return {
        "peer": "hf-generate-batched",
        "version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "speculative_config": None,
        "points": points,
    }
