"""Model resolution: built-in names, local folders, clear errors."""

import pytest

from coralline import models
from coralline.target import TargetConfig, TargetRunner

from .tiny import tiny_llama


def test_local_folder_loads(tmp_path):
    tiny_llama(16).save_pretrained(tmp_path / "m")
    assert models.resolve(str(tmp_path / "m")) == tmp_path / "m"
    model, _ = models.load(str(tmp_path / "m"))
    assert model.config.vocab_size == 16


def test_unknown_model_and_bad_config():
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*smollm2-135m-instruct"):
        models.resolve("nope")
    with pytest.raises(ValueError, match="dtype must be one of"):
        TargetConfig(dtype="float8")


def test_builtin_smollm2_is_cached_and_reloads(smollm2):
    folder = models.resolve("smollm2-135m-instruct")
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    assert folder.parent.parent == models.cache_dir()
    assert smollm2.vocab_size == 49152 and smollm2.hidden_size == 576
    assert 2 in smollm2.eos_token_ids
    ids = smollm2.encode("Hello")
    assert ids[-3:] == smollm2.encode("Hi")[-3:]  # the chat template's generation prompt
    assert isinstance(smollm2, TargetRunner)


def test_token_weights_alone_identify_the_target(smollm2):
    """What the drafter service loads: the embedding / LM-head rows, never the layers, with the
    same fingerprint as the full model (so heads for another target are refused)."""
    import torch

    from coralline.models import load_token_weights

    w = load_token_weights("smollm2-135m-instruct")
    assert w.fingerprint == smollm2.fingerprint
    assert w.lm_head is w.embed  # tied in SmolLM2: one tensor, not two
    assert torch.equal(w.embed, smollm2.model.get_input_embeddings().weight)
    assert w.eos_token_ids <= smollm2.eos_token_ids and w.vocab_size == smollm2.vocab_size
