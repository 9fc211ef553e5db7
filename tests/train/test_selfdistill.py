"""Self-distillation data on the real target: answers are the target's own greedy tokens,
batches resume, and the feature dump reads the file."""

import json

import pytest
import torch

from coralline.train.features import DumpConfig, dump, load_shards
from coralline.train.selfdistill import SelfDistillConfig, generate, load_examples


@pytest.mark.slow
def test_answers_are_the_targets_greedy_tokens_and_resume(tmp_path, smollm2):
    out = tmp_path / "sd.jsonl"
    cfg = SelfDistillConfig(out=str(out), prompts=3, batch_size=2, max_new_tokens=10)
    generate(cfg)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 3
    for rec in recs:
        mask = rec["loss_mask"]
        n_prompt = mask.index(1)
        assert all(mask[n_prompt:]) and not any(mask[:n_prompt])
        prompt, answer = rec["input_ids"][:n_prompt], rec["input_ids"][n_prompt:]
        ref = smollm2.model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, attention_mask=None
        )[0, n_prompt:].tolist()
        assert answer == ref[: len(answer)] and len(answer) in (len(ref), 10)  # padded batch
        # == the unpadded greedy answer (EOS ends it early)

    # an interrupted write leaves a cut line: it is dropped, and the run resumes after it
    with out.open("a") as f:
        f.write('{"id": "cut", "input_ids": [1, 2')
    generate(SelfDistillConfig(out=str(out), prompts=4, batch_size=2, max_new_tokens=10))
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and [json.loads(x) for x in lines[:3]] == recs

    examples = list(load_examples(out, max_tokens=448))
    assert len(examples) == 4
    dumped = dump(DumpConfig(out_dir=str(tmp_path / "f"), max_tokens=448, data=str(out)))
    convs = load_shards(dumped)
    assert [c["input_ids"].tolist() for c in convs] == [e.input_ids for e in examples]
    assert all(c["features"].shape[0] == c["input_ids"].numel() for c in convs)


def test_config_is_validated():
    with pytest.raises(ValueError, match=">= 1"):
        SelfDistillConfig(out="x", prompts=0)
    with pytest.raises(ValueError, match="shard"):
        SelfDistillConfig(out="x", num_shards=2, shard=2)


@pytest.mark.slow
def test_shards_split_the_prompts_and_train_draft_reads_the_files(tmp_path, smollm2):
    """Shard k of K takes every K-th prompt: the shards are disjoint and together they are the
    unsharded prompt list. The CLI writes a shard; `--data` reads packs and .jsonl files in
    order."""
    import itertools

    from coralline.cli import main
    from coralline.train.data import Example, save_pack
    from coralline.train.selfdistill import _prompts
    from coralline.train.trainer import TrainConfig, load_conversations

    tok = smollm2.tokenizer
    whole = list(itertools.islice(_prompts(tok, SelfDistillConfig(out="x")), 6))
    shards = [
        list(itertools.islice(_prompts(tok, SelfDistillConfig(out="x", num_shards=2, shard=k)), 3))
        for k in (0, 1)
    ]
    assert [p for pair in zip(*shards, strict=True) for p in pair] == whole

    out = tmp_path / "shard1.jsonl"
    args = ["self-distill", "--out", str(out), "--prompts", "2", "--num-shards", "2",
            "--shard", "1", "--max-new-tokens", "8", "--batch", "2"]  # fmt: skip
    assert main(args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [conv_id for conv_id, _ in shards[1][:2]]
    assert [r["input_ids"][: len(p)] for r, (_, p) in zip(recs, shards[1], strict=False)] == [
        p for _, p in shards[1][:2]
    ]

    pack = save_pack([Example("a", [1, 2, 3], [0, 1, 1])], tmp_path / "pack", {})  # any name
    cfg = TrainConfig(features="", out="", data=f"{pack},{out}", max_tokens=448)
    convs = load_conversations(cfg)  # (load_examples keeps answers of >= 8 tokens)
    assert [c["input_ids"].tolist() for c in convs] == [[1, 2, 3]] + [r["input_ids"] for r in recs]
    assert [c["loss_mask"].tolist() for c in convs[1:]] == [
        [bool(m) for m in r["loss_mask"]] for r in recs
    ]
    with pytest.raises(ValueError, match="not 'sharegpt' nor a file"):
        load_conversations(TrainConfig(features="", out="", data=str(tmp_path / "none.jsonl")))
    (tmp_path / "data.txt").write_text("text")
    with pytest.raises(ValueError, match="unknown training data"):
        load_conversations(TrainConfig(features="", out="", data=str(tmp_path / "data.txt")))


def test_train_draft_without_any_data_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "coralline.cli",
            "train-draft",
            "--out",
            str(tmp_path / "o"),
            "--max-tokens",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "no training data" in res.stderr, res.stderr[-500:]
    assert not (tmp_path / "o").exists()
