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
