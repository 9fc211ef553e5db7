"""Dump the target's features for training data, once, to fp16 shards on disk.

For each rendered conversation: input ids [T] int32, assistant mask [T] uint8 and the target's
last hidden state (after the final norm: what the LM head sees) [T, d] fp16. Shards are
safetensors files of `shard_size` conversations with an offsets tensor; a shard is written to a
temporary name and renamed, so an interrupted dump resumes at the first missing shard. The
target's logits are NOT stored: they are lm_head(features), recomputed during training.

Knows nothing about the draft head.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from coralline.train.data import Example, training_examples


@dataclass(frozen=True)
class DumpConfig:
    out_dir: str
    model: str = "smollm2-135m-instruct"
    max_tokens: int = 384  # per conversation: long enough for multi-turn context, cheap to dump
    max_total_tokens: int = 300_000  # ~25 min of fp32 forwards on one CPU thread
    shard_size: int = 64  # conversations per shard: a resume loses at most one shard of work
    heldout_fraction: float = 0.02  # held-out conversations are never dumped for training
    data: str = "sharegpt"  # or a self-distillation JSONL file (train/selfdistill.py)


def _examples(tokenizer, cfg: DumpConfig) -> Iterator[Example]:
    if cfg.data != "sharegpt":
        from coralline.train.selfdistill import load_examples

        yield from load_examples(cfg.data, cfg.max_tokens)
        return
    yield from training_examples(tokenizer, cfg.max_tokens, cfg.heldout_fraction)


def _stream_keys(config: dict) -> dict:
    config = {"data": "sharegpt", **config}  # dumps made before `data` existed
    return {k: v for k, v in config.items() if k not in ("out_dir", "max_total_tokens")}


def dumped_tokens(folder: str | Path) -> int:
    """Tokens in a finished dump (0 when unfinished or absent)."""
    done = Path(folder) / "DONE"
    return int(done.read_text()) if done.exists() else 0


def dump(cfg: DumpConfig) -> Path:
    from coralline.target import TargetConfig, TargetRunner

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    runner = TargetRunner.load(TargetConfig(model=cfg.model))
    meta = {
        "config": asdict(cfg),
        "hidden_size": runner.hidden_size,
        "vocab_size": runner.vocab_size,
    }
    if meta_path.exists():
        old = json.loads(meta_path.read_text())["config"]
        # a dump is a prefix of one stream of conversations: raising max_total_tokens extends it
        if _stream_keys(old) != _stream_keys(meta["config"]):
            raise ValueError(f"{out} holds a dump made with another config; use another --out")
        (out / "DONE").unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    bar = tqdm(
        total=cfg.max_total_tokens, unit="tok", desc="dumping target features", file=sys.stderr
    )
    shard, batch, total = 0, [], 0
    for ex in _examples(runner.tokenizer, cfg):
        if total >= cfg.max_total_tokens:
            break
        batch.append(ex)
        total += len(ex.input_ids)
        if len(batch) == cfg.shard_size:
            _write_shard(runner, out, shard, batch, bar)
            shard, batch = shard + 1, []
    if batch:
        _write_shard(runner, out, shard, batch, bar)
    bar.close()
    (out / "DONE").write_text(str(total))
    return out


def _write_shard(runner, out: Path, shard: int, batch: list[Example], bar) -> None:
    path = out / f"shard_{shard:05d}.safetensors"
    n_tok = sum(len(e.input_ids) for e in batch)
    if path.exists() and _shard_len(path) == len(batch):  # resume: this shard is done
        bar.update(n_tok)
        return  # (a shorter last shard of a smaller dump is rewritten whole)
    feats, ids, mask, offsets = [], [], [], [0]
    with torch.inference_mode():
        for ex in batch:
            t = torch.tensor([ex.input_ids])
            h = runner.model.model(input_ids=t).last_hidden_state[0]  # [T, d]
            feats.append(h.to(torch.float16))
            ids.append(torch.tensor(ex.input_ids, dtype=torch.int32))
            mask.append(torch.tensor(ex.loss_mask, dtype=torch.uint8))
            offsets.append(offsets[-1] + len(ex.input_ids))
            bar.update(len(ex.input_ids))
    tmp = path.with_suffix(".tmp")
    save_file(
        {
            "features": torch.cat(feats),
            "input_ids": torch.cat(ids),
            "loss_mask": torch.cat(mask),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        },
        str(tmp),
    )
    os.replace(tmp, path)


def _shard_len(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("offsets").get_shape()[0] - 1


def load_shards(folder: str | Path) -> list[dict[str, torch.Tensor]]:
    """Every conversation of a dump: dicts of input_ids [T], loss_mask [T], features [T, d]."""
    folder = Path(folder)
    shards = sorted(folder.glob("shard_*.safetensors"))
    if not shards:
        raise ValueError(f"no feature shards in {folder}: run `coralline train-draft dump` first")
    out = []
    for path in shards:
        s = load_file(str(path))
        off = s["offsets"].tolist()
        for a, b in itertools.pairwise(off):
            out.append(
                {
                    "input_ids": s["input_ids"][a:b].long(),
                    "loss_mask": s["loss_mask"][a:b].bool(),
                    "features": s["features"][a:b],
                }
            )
    return out
