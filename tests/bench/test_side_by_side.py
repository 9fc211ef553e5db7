"""`coralline bench` (every method side by side): the quick mode CI runs, end to end on SmolLM2,
and the pieces it is built from."""

import itertools
import json
import subprocess
import sys

import pytest

from coralline.bench import report
from coralline.bench import side_by_side as bench

from ..tiny import tiny_llama


def test_config_validation_and_quick_preset():
    with pytest.raises(ValueError, match="must be >= 1"):
        bench.BenchConfig(prompts_per_set=0)
    q = bench.BenchConfig.quick(threads=2)
    assert (q.prompts_per_set, q.max_new_tokens, q.threads) == (1, 24, 2)


def test_methods_put_every_verifier_side_by_side_on_one_drafter():
    ms = bench.methods(assistant=False)
    t1 = {m.label for m in ms if m.temperature == 1.0}
    for v in ("traversal", "rrsw", "eagle"):
        assert f"coral/{v}" in t1
    assert {"coral-chain/token_level", "coral-chain/block"} <= t1
    assert "hf_assisted" not in {m.name for m in ms}
    assert "hf_assisted" in {m.name for m in bench.methods(assistant=True)}
    assert len({(m.temperature, m.label) for m in ms}) == len(ms)  # unique keys


def test_peak_memory_sees_what_a_method_allocates():
    """In a fresh process: in this one, memory that earlier tests free while the measurement
    runs (their models collected, their threads ending) lowers the RSS under the peak."""
    code = (
        "import torch; from coralline.bench.side_by_side import PeakMemory\n"
        "m = PeakMemory('cpu'); m.reset()\n"
        "x = torch.ones(64 * 2**20); x.add_(1)  # 256 MB, touched\n"
        "peak, added = m.read(); print(peak, added)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, added = map(float, out.stdout.split())
    assert added > 200 and peak >= added


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "coralline.cli", *args], capture_output=True, text=True, timeout=1200
    )


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    """What CI runs: every method on the same prompts; the target itself stands in as the
    assistant of HF assisted generation (a smaller one does not exist for SmolLM2-135M)."""
    out = tmp_path / "bench"
    res = _cli(
        "bench",
        "--quick",
        "--max-new-tokens",
        "8",
        "--assistant",
        "smollm2-135m-instruct",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "bench.json").read_text())
    assert rep["prompt_sets"] == {"followeval": 1, "ifeval": 1, "sharegpt_heldout": 1}
    rows = {(r["temperature"], r["label"]): r for r in rep["results"]}
    assert {m_.label for m_ in bench.methods(True)} == {label for _, label in rows}
    for (t, label), r in rows.items():
        assert r["tokens"] > 0 and r["tokens_per_second"] > 0, label
        assert r["peak_memory_mb"] > 0
        if t == 0:
            assert r["identical_to_hf_greedy"], f"{label} changed a greedy output"
        if r["kind"] == "engine":
            depth = r["acceptance_by_depth"]
            assert r["tau"] >= 1 and len(depth) == 6
            assert all(a >= b for a, b in itertools.pairwise(depth))
            assert r["rounds"] > 0 and r["verify_ms_per_round"] > 0
            # each round commits its accepted drafts + 1 (the last one may be cut at the limit)
            assert r["rounds"] <= r["tokens"] <= r["rounds"] * r["tau"] + 1e-6
        else:
            assert r["tau"] is None
    assert rows[(0.0, "hf_generate")]["speedup"] == 1.0
    assert rows[(1.0, "hf_sample")]["speedup"] == 1.0
    assert rows[(0.0, "engine_plain")]["tau"] == 1.0  # no drafts, one token per round
    assert rows[(0.0, "coral-eagle2")]["tau"] > 1.0  # the shipped head drafts
    md = (out / "bench.md").read_text()
    assert "| coral/traversal |" in md and "command: `coralline bench --quick" in md
    for name in report.PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


@pytest.mark.slow
def test_assistant_with_another_tokenizer_is_refused(tmp_path, smollm2):
    folder = tmp_path / "tiny"
    tiny_llama(16).save_pretrained(folder)
    with pytest.raises(ValueError, match="tokenizer"):
        bench.load_assistant(str(folder), smollm2.tokenizer, "cpu")


@pytest.mark.slow
def test_coral_ablation_bench_measures_each_checkpoint(tmp_path):
    from coralline.draft.registry import shipped_head

    head = str(shipped_head("smollm2-135m-instruct"))
    out = tmp_path / "abl.json"
    res = _cli(
        "bench", "coral", "--quick", "--ablation-only", "--ablation", head, "--out", str(out)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    (row,) = rep["ablations"]
    assert row["checkpoint"] == report.display_path(head) and row["recipe"]["steps"] == 3
    for label in ("tree60_full", "auto_grouped"):
        assert row[label]["identical"], label  # greedy outputs equal plain decoding
        assert row[label]["tau"] > 1.0 and row[label]["speedup"] > 0


@pytest.mark.slow
def test_coral_tau_by_prompt_set_reports_the_head_alone_and_with_lookup(tmp_path):
    out = tmp_path / "tau.json"
    res = _cli("bench", "coral", "--quick", "--tau-prompts", "3", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["tau"]) == {"coral-eagle2", "coral-eagle2-lookup"}
    for row in rep["tau"].values():
        assert set(row) == {"bench", "all"}  # 3 prompts: all of them in the bench's set
        assert row["all"]["prompts"] == 3 and row["all"]["rounds"] == row["bench"]["rounds"]
        assert 1.0 < row["all"]["tau"] <= 1 + 59  # a trained head drafts; at most 59 drafts
    bad = _cli("bench", "coral", "--tau-prompts", "-1")
    assert bad.returncode == 2 and "--tau-prompts must be >= 0" in bad.stderr
