"""The feature dump on the real target: fp16 shards, resume, extension of a smaller dump."""

import json

import pytest
import torch

from coralline.train.features import DumpConfig, _shard_len, dump, dumped_tokens, load_shards

pytestmark = pytest.mark.slow


def test_dump_resumes_and_extends_as_a_prefix_of_one_stream(tmp_path, smollm2):
    out = tmp_path / "dump"
    small = DumpConfig(out_dir=str(out), max_tokens=96, max_total_tokens=400, shard_size=3)
    dump(small)
    first = load_shards(out)
    assert dumped_tokens(out) >= 400
    assert all(c["features"].dtype == torch.float16 for c in first)
    assert all(c["features"].shape == (c["input_ids"].numel(), 576) for c in first)
    assert all(c["loss_mask"].any() for c in first)  # every example has assistant tokens

    # the same stream, longer: earlier conversations are kept, a short last shard is completed
    dump(DumpConfig(out_dir=str(out), max_tokens=96, max_total_tokens=900, shard_size=3))
    longer = load_shards(out)
    assert dumped_tokens(out) >= 900 and len(longer) > len(first)
    for a, b in zip(first, longer, strict=False):
        assert torch.equal(a["input_ids"], b["input_ids"])
    shards = sorted(out.glob("shard_*.safetensors"))
    assert all(_shard_len(p) == 3 for p in shards[:-1])

    # a finished shard is never recomputed: its bytes do not change on a rerun
    before = shards[0].read_bytes()
    dump(DumpConfig(out_dir=str(out), max_tokens=96, max_total_tokens=900, shard_size=3))
    assert shards[0].read_bytes() == before

    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["max_total_tokens"] == 900
    with pytest.raises(ValueError, match="another config"):
        dump(DumpConfig(out_dir=str(out), max_tokens=128, max_total_tokens=900, shard_size=3))
