"""Batched greedy generation with Hugging Face `generate` (left padding, attention mask).

The fast path for offline work that needs the target alone on many prompts: self-distillation
data and scoring the target on an instruction-following set. Batches of 32 run ~4x faster than
one prompt at a time on one CPU thread. Padding can flip a near-tied argmax, rarely, so this is
NOT the reference for "identical to greedy" checks (the engine and unbatched HF are).

Knows nothing about drafting or verification.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def greedy_batches(
    model,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    pad_id: int | None = None,
    desc: str | None = None,
) -> Iterator[list[list[int]]]:
    """For each batch of prompts (in order), the greedy answers' token ids (EOS included when
    reached). Inside a batch, prompts are sorted by length to reduce padding."""
    eos = eos_ids(model)
    pad = pad_id if pad_id is not None else min(eos) if eos else 0
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, disable=not desc)
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b : b + batch_size]
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(order):
            p = batch[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            att[r, width - len(p) :] = 1
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=att.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )[:, width:].tolist()
        answers: list[list[int]] = [[] for _ in batch]
        for r, i in enumerate(order):
            for t in gen[r]:
                answers[i].append(t)
                if t in eos:
                    break
        bar.update(len(batch))
        yield answers
    bar.close()
