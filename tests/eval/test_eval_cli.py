"""`coralline eval` end to end on SmolLM2 (small limits): reports are written and speculation
changes no output."""

import json
import subprocess
import sys

import pytest

from coralline.eval.ifeval import default_data_path

IFEVAL = default_data_path()


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "coralline.cli", *args], capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_eval_lossless_reports_identical_outputs(tmp_path):
    out = tmp_path / "lossless.json"
    res = _cli(
        "eval",
        "lossless",
        "--drafter",
        "ngram",
        "--limit",
        "3",
        "--ifeval-limit",
        "2",
        "--max-new-tokens",
        "24",
        "--data",
        str(IFEVAL),
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["identical_rate"] == 1.0
    for label in ("plain", "speculative"):
        assert 0.0 <= report[label]["followeval_accuracy"] <= 1.0
        assert set(report[label]["ifeval"]) >= {"prompt_level_strict", "instruction_level_loose"}
    assert report["plain"]["followeval_accuracy"] == report["speculative"]["followeval_accuracy"]


@pytest.mark.slow
def test_eval_followeval_and_ifeval_write_reports(tmp_path):
    out = tmp_path / "fe.json"
    res = _cli(
        "eval",
        "followeval",
        "--drafter",
        "none",
        "--limit",
        "4",
        "--max-new-tokens",
        "16",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["items"] == 4 and "by_language_dimension" in report
    res = _cli(
        "eval",
        "ifeval",
        "--drafter",
        "none",
        "--limit",
        "2",
        "--max-new-tokens",
        "16",
        "--data",
        str(IFEVAL),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "IFEval on 2 prompts" in res.stdout
    res = _cli("eval", "ifeval", "--data", "/nonexistent/input_data.jsonl")
    assert res.returncode == 2 and "no IFEval data" in res.stderr


@pytest.mark.slow
def test_ifeval_hf_batched_backend_scores_the_target_alone(tmp_path):
    """The fast whole-set path: batched HF greedy; its answers match the engine's plain greedy
    answers on these prompts (padding could flip a near-tie, which these do not have)."""
    outs = {}
    for backend in ("hf-batched", "engine"):
        out = tmp_path / f"{backend}.json"
        args = ["--backend", backend, "--batch-size", "2"] if backend == "hf-batched" else []
        res = _cli(
            "eval",
            "ifeval",
            "--drafter",
            "none",
            "--limit",
            "3",
            "--max-new-tokens",
            "12",
            "--data",
            str(IFEVAL),
            "--out",
            str(out),
            *args,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        outs[backend] = json.loads(out.read_text())
    hf, eng = outs["hf-batched"], outs["engine"]
    assert hf["backend"] == "hf-batched" and hf["prompts"] == 3
    assert [r["response"] for r in hf["responses"]] == [r["response"] for r in eng["responses"]]
    assert hf["average_strict"] == eng["average_strict"]
