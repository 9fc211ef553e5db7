"""Self-distillation data: the target's own greedy answers to ShareGPT prompts.

A draft head is judged on the target's own continuations (tau is measured on what the target
generates), while ShareGPT answers were written by other models: training on the target's
answers puts the head on the distribution it will meet (Medusa-2 and DistillSpec report gains
from such data). Prompts are the first user turn of TRAINING conversations (the held-out split
is never touched); answers are generated in left-padded batches with HF `generate`, greedy, and
kept as token ids (re-tokenising the text could change them), EOS included: the head must learn
to predict the end too.

Output: one JSONL file, a line per example {"id", "input_ids", "loss_mask"} (the mask marks the
answer), appended batch by batch, so an interrupted run resumes after its last full batch.
features.dump reads it (DumpConfig.data). Knows nothing about the draft head.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from coralline.hf_batch import greedy_batches


@dataclass(frozen=True)
class SelfDistillConfig:
    out: str  # the JSONL file
    model: str = "smollm2-135m-instruct"
    prompts: int = 1000
    max_prompt_tokens: int = 192
    max_new_tokens: int = 256
    batch_size: int = 32  # ~160 tok/s on one CPU thread at 32 (4x batch 1)
    heldout_fraction: float = 0.02  # must match the dump's: held-out prompts are never used
    num_shards: int = 1  # prompt k belongs to shard k % num_shards: several processes (one
    shard: int = 0  # per core, each its own file) generate disjoint answers in parallel

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("prompts, batch_size and max_new_tokens must be >= 1")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard must be in [0, {self.num_shards}), got {self.shard}")


def _prompts(tokenizer, cfg: SelfDistillConfig) -> Iterator[tuple[str, list[int]]]:
    from coralline.train.data import conversations

    k = 0
    for conv in conversations("train", cfg.heldout_fraction):
        first = conv["messages"][0]
        if first["role"] != "user":
            continue
        ids = tokenizer.apply_chat_template(
            [first], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        if 4 <= len(ids) <= cfg.max_prompt_tokens:
            if k % cfg.num_shards == cfg.shard:
                yield conv["id"], list(ids)
            k += 1


def generate(cfg: SelfDistillConfig) -> Path:
    from coralline import models

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _valid_prefix(out)
    model, tok = models.load(cfg.model)
    if tok is None:
        raise ValueError(f"{cfg.model} has no tokenizer: self-distillation needs one")
    todo: list[tuple[str, list[int]]] = []
    for k, item in enumerate(_prompts(tok, cfg)):
        if k >= cfg.prompts:
            break
        if k >= done:
            todo.append(item)
    bar = tqdm(
        total=cfg.prompts, initial=done, desc="self-distillation", unit="prompt", file=sys.stderr
    )
    batches = greedy_batches(
        model, [p for _, p in todo], cfg.max_new_tokens, cfg.batch_size, tok.pad_token_id
    )
    for b, answers in enumerate(batches):  # appended batch by batch: resume counts lines
        batch = todo[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        lines = [
            json.dumps(
                {
                    "id": conv_id,
                    "input_ids": prompt + answer,
                    "loss_mask": [0] * len(prompt) + [1] * len(answer),
                }
            )
            for (conv_id, prompt), answer in zip(batch, answers, strict=True)
        ]
        with out.open("a") as f:
            f.write("\n".join(lines) + "\n")
        bar.update(len(batch))
    bar.close()
    return out


def _valid_prefix(path: Path) -> int:
    """Examples already written; a line cut by an interrupted write is dropped."""
    if not path.exists():
        return 0
    good = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        good.append(line)
    path.write_text("".join(g + "\n" for g in good))
    return len(good)


def load_examples(path: str | Path, max_tokens: int):
    """Examples of a self-distillation file, cut at max_tokens (for features.dump)."""
    from coralline.train.data import Example

    with Path(path).open() as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            ids, mask = rec["input_ids"][:max_tokens], rec["loss_mask"][:max_tokens]
            if sum(mask) >= 8:
                yield Example(rec["id"], ids, mask)
