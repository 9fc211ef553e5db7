"""Tiny random Llama models for fast unit tests (never for figures)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coralline.target import TargetRunner


def tiny_llama(vocab: int = 12, seed: int = 0, hidden: int = 32, layers: int = 2, scale=1.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # sharper or flatter next-token distributions
    model.generation_config.eos_token_id = None
    return model


def perturbed(model, noise: float, seed: int):
    """A draft model that resembles `model`: same weights plus Gaussian noise."""
    torch.manual_seed(seed)
    clone = LlamaForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    clone.generation_config.eos_token_id = None
    return clone


def tiny_runner(vocab: int = 12, seed: int = 0, kv: str = "dynamic", **kw) -> TargetRunner:
    """kv "dynamic": the reference DynamicCache; "pooled": a session of a batch scheduler
    (KV pool slot, ragged batched forward; prompts enter in chunks of 3 tokens)."""
    runner = TargetRunner(tiny_llama(vocab, seed, **kw), None)
    if kv == "pooled":
        from coralline.batching.scheduler import BatchConfig, pooled

        return pooled(runner, BatchConfig(slots=4, prefill_chunk=3)).fork()
    if kv != "dynamic":
        raise ValueError(f"kv must be 'dynamic' or 'pooled', got {kv!r}")
    return runner
