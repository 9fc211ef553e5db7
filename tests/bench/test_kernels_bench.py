"""`coralline bench kernels` (bench/kernels.py) on the real target: both A/Bs run at every point
that has them, the variants' logits agree (the kernel attention within float rounding, the
two oneDNN packs bitwise from 2 rows), and the JSON, markdown and plot are written."""

import json

from coralline.bench import kernels


def test_the_kernel_bench_reports_both_abs_with_agreeing_logits(tmp_path):
    cfg = kernels.KernelBenchConfig.quick(sessions=(1, 4))
    paths = kernels.main(tmp_path / "kernels.json", cfg, command="test")
    assert [p.name for p in paths] == ["kernels.json", "kernels.md", "kernels.png"]
    report = json.loads(paths[0].read_text())
    one, four = report["points"]
    assert one["sessions"] == 1 and "attention" not in one  # a lone item attends alone
    assert report["notes"] == []  # the kernel and the blocked pack exist here
    att, pack = four["attention"], four["pack"]
    assert att["sdpa_ms"] > 0 and att["kernel_ms"] > 0
    assert att["argmax_equal"] and att["max_abs_diff"] < 1e-3
    assert pack["plain_ms"] > 0 and pack["blocked_ms"] > 0
    assert pack["bitwise_equal"] and one["pack"]["argmax_equal"]
    assert "| 4 |" in paths[1].read_text() and paths[2].stat().st_size > 1000
