"""Drafters by name: what the CLI, the benchmarks and the drafter service build.

Knows which checkpoints ship with the package; knows nothing about verification.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DRAFTERS = (
    "coral",
    "coral-nolookup",
    "coral-full",
    "coral-eagle2",
    "coral-eagle2-lookup",
    "coral-chain",
    "ngram",
    "ngram-tree",
    "none",
)


def shipped_head(model: str):
    """The CORAL checkpoint installed with the package for a built-in target, or None. A local
    folder named like a built-in target (a container's /models/smollm2-135m-instruct) gets that
    target's head too: the head checks the target's fingerprint when it attaches."""
    data = resources.files("coralline") / "data"
    for name in dict.fromkeys([model, Path(model).name]):
        path = data / f"coral-{name}"
        if (path / "config.json").is_file():
            return path
    return None


def make_drafter(
    name: str,
    target=None,
    checkpoint: str | None = None,
    *,
    weights=None,
    device: str | None = None,
    dtype=None,
):
    """A drafter by name: what the CLI, the benchmarks and the drafter service build.

    coral                the CORAL head with the grouped LM head, tree size by the budget
                         chooser, plus the prompt-lookup continuation at T = 0 (the default)
    coral-nolookup       the same without prompt lookup (the head's own trees)
    coral-full           coral with the full LM head
    coral-eagle2         the full LM head and EAGLE-2's fixed tree (depth 6, top-k 10, 60 nodes):
                         the head's tau reference
    coral-eagle2-lookup  the same 60 nodes shared with the prompt-lookup continuation
    coral-chain          the grouped head drafting one sequence (for the chain-only verifiers)

    A CORAL head needs the target's token weights: from a loaded `target` (a TargetRunner,
    in-process) or from `weights` (models.TokenWeights: the embedding and LM head alone, what
    the drafter service loads). `device` / `dtype` place the head (default: the weights').
    """
    from coralline.draft.ngram import NgramConfig, NgramDrafter

    if name == "none":
        return None
    if name == "ngram":
        return NgramDrafter()
    if name == "ngram-tree":
        return NgramDrafter(NgramConfig(max_paths=4))
    if name.startswith("coral"):
        from coralline.cpu_linear import cpu_inference_linears
        from coralline.draft.coral import CoralHead
        from coralline.draft.coral_drafter import CoralDrafter

        config = coral_config(name)  # unknown names fail before anything loads
        if target is None and weights is None:
            raise ValueError("the CORAL drafter needs the target's embedding and LM head")
        model = target.config.model if target is not None else weights.name
        path = checkpoint or shipped_head(model)
        if path is None:
            raise ValueError(
                f"no CORAL head is shipped for {model!r}: train one with `coralline train-draft` "
                "and pass --draft-checkpoint DIR"
            )
        head = CoralHead.load(str(path))
        if target is not None:
            head.attach(target.model)
        else:
            head.attach_weights(weights.embed, weights.lm_head, weights.fingerprint)
        shared = head._embed
        head = head.to(device or shared.device, dtype or shared.dtype)
        cpu_inference_linears(head)  # on a CPU in fp32, the head's few-row calls on oneDNN's
        # blocked weights, as the target's (inference only: a head to train is loaded with
        # CoralHead.load)
        if config.grouped:
            head.prepare_grouped()  # at load time, not inside the first request
        return CoralDrafter(head, config)
    raise ValueError(f"unknown drafter {name!r}; choose one of: {', '.join(DRAFTERS)}")


def drafter_kind(name: str) -> tuple[str, bool]:
    """(tree_kind, chain_only) of a drafter by name, without building it: what a verifier
    needs to pick the lossless verifier for a remote drafter."""
    check_name(name)
    if name.startswith("coral"):
        return "sampled_swor", name == "coral-chain"
    if name == "none":
        return "deterministic", True
    return "deterministic", name == "ngram"


def drafter_factory(
    name: str,
    target=None,
    checkpoint: str | None = None,
    *,
    weights=None,
    device: str | None = None,
    dtype=None,
):
    """A zero-argument callable building fresh drafters (one per session) that share the
    heavy parts (a CORAL head is loaded once); see make_drafter for the arguments."""
    first = make_drafter(name, target, checkpoint, weights=weights, device=device, dtype=dtype)
    if first is None:
        return lambda: None
    from coralline.draft.coral_drafter import CoralDrafter

    if isinstance(first, CoralDrafter):
        head, config, cost = first.head, first.config, first.cost
        return lambda: CoralDrafter(head, config, cost)
    return lambda: make_drafter(name)  # model-free drafters are cheap to build


def coral_config(name: str):
    """The CoralDrafterConfig behind a registry name (coral, coral-full, ...)."""
    from coralline.draft.coral_drafter import CoralDrafterConfig

    configs = [
        CoralDrafterConfig(grouped=True, lookup=True),
        CoralDrafterConfig(grouped=True),
        CoralDrafterConfig(grouped=False, lookup=True),
        CoralDrafterConfig(budget="max", grouped=False),
        CoralDrafterConfig(budget="max", grouped=False, lookup=True),
        CoralDrafterConfig(grouped=True, chain=True),
    ]
    by_name = {c.registry_name(): c for c in configs}
    if name not in by_name:
        raise ValueError(f"unknown CORAL drafter {name!r}; choose one of: {', '.join(by_name)}")
    return by_name[name]


def default_drafter(model: str) -> str:
    """CORAL when a head ships for the model, else the model-free n-gram drafter."""
    return "coral" if shipped_head(model) is not None else "ngram"


def check_name(name: str) -> None:
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; choose one of: {', '.join(DRAFTERS)}")
