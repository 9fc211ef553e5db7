"""Training the CORAL head on dumped target features. Every ingredient can be switched off.

Per conversation (positions t = 0..T-2; x = token ids, f = target features, p_t = softmax of
the target's logits lm_head(f_t)):
  step 1 (EAGLE)   input (E[x_{t+1}], f_t) -> g1_t ~ f_{t+1}
  step j <= steps  (HASS multi-step) input (E[x_{t+1}], g{j-1}_{t-1}.detach()): the head's own
                   feature of the previous position, as at draft depth j. Its query at t attends
                   to step-1 keys at positions <= t-j+1 (target-feature context) and to the
                   step-i key at position t-j+i for i = 2..j (its own draft path) — exactly
                   the attention pattern of a depth-j draft node at inference.
  loss per step    SmoothL1(g_t, f_{t+1}) + ce_weight * CE(p_{t+1}, softmax(lm_head(g_t)))
                   on positions whose predicted token x_{t+2} is an assistant token
  CSRA             (our reconstruction) InfoNCE between the L2-normalised outputs of two steps
                   at the same positions (positives) vs other positions of the sequence
                   (negatives), temperature csra_temperature, for every pair of steps, weight
                   csra_weight
  top-K distill    (HASS's second phase, distill_epochs) + topk_weight *
                   -sum_{k in topK(p)} p(k) log q(k)
  router stage     head frozen; the router learns each group's probability mass under the full
                   LM head (soft cross-entropy), on the outputs of every step
Init: random decoder layer (starting from the target's last layer was measured worse: top-1
0.07 vs 0.17 after the same 90 steps, the copy collapses to near-constant outputs); the output
norm starts from the target's final norm.
Batches: `batch` conversations right-padded into one forward (pad_batch); every loss term is a
mean over the batch's trained positions (token-weighted), CSRA's negatives stay within each
sequence. batch = 1 is the per-conversation CPU recipe; on a GPU, batch 16 trains ~76
conversations/s (H200, 1024-token conversations, features online).
Data: dumped feature shards (features.py), or online: token ids only (a pack from
data.build_pack, or ShareGPT rendered at start) with the target computing each batch's
features on `device`: no dump, which on a GPU costs less than reading one.
Seeded; resumable (train_state.pt every `checkpoint_every` optimizer steps); tqdm progress;
an optional time budget (time_limit_s) on which the cosine schedule and the top-K phase run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from coralline.draft.coral import CoralHead, config_for_target
from coralline.train.features import load_shards


@dataclass(frozen=True)
class TrainConfig:
    features: str  # folder(s) written by features.dump, comma-separated ("" = online)
    out: str  # checkpoint folder
    data: str = ""  # online training (no dump): comma-separated sources, each a pack file
    # (data.build_pack), "sharegpt" or a self-distillation .jsonl (train/selfdistill.py); the
    # target computes each batch's features on `device`
    max_tokens: int = 384  # per conversation, for "sharegpt" and .jsonl sources
    device: str = "cpu"  # "cuda" trains head and (online) target on the GPU
    batch: int = 1  # conversations per forward (right-padded); 1 = the CPU recipe
    time_limit_s: float = 0.0  # 0 = none; else phase 1 + 2 stop after this many seconds
    # (the learning rate anneals on that clock; a later run with a larger limit resumes)
    model: str = "smollm2-135m-instruct"
    steps: int = 3  # HASS steps; 1 = plain EAGLE training
    csra: bool = True
    csra_weight: float = 0.2  # inside the 0.1-1 range the reconstruction suggests
    csra_temperature: float = 0.1  # inside 0.05-0.2
    csra_positions: int = 256  # positions sampled per sequence for InfoNCE (bounds the cost)
    ce_weight: float = 0.1  # EAGLE's weight on the token cross-entropy
    epochs: int = 2
    distill_epochs: int = 1  # phase 2 with the top-K term; 0 = off
    topk: int = 10
    topk_weight: float = 1.0
    router: bool = True
    router_epochs: int = 1
    router_conversations: int = 800  # the router stage reads this many (0 = all): it converges
    # long before an epoch of a large dump, and costs a full LM head per position
    lr: float = 1e-3  # best of 3e-4 / 1e-3 / 2e-3 on 120 conversations (top-1 .17 / .22 / .20)
    router_lr: float = 1e-3
    warmup: int = 50
    accumulate: int = 4  # conversations per optimizer step (~1.2k tokens)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    max_conversations: int = 0  # 0 = all in the dump
    init: str = ""  # warm start: a checkpoint folder (its fp32 train_state.pt when present)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.batch < 1 or self.accumulate < 1:
            raise ValueError("batch and accumulate must be >= 1")
        if self.csra and self.steps < 2:
            raise ValueError("CSRA aligns different steps: it needs steps >= 2 (or --no-csra)")


def step_mask(length: int, j: int, dtype=torch.float32) -> torch.Tensor:  # [L, j * L]
    """Additive mask of step j's queries over the keys of steps 1..j (see the module doc)."""
    t = torch.arange(length)
    allow = [t[None, :] <= (t[:, None] - j + 1)]  # step-1 keys: target-feature context
    for i in range(2, j + 1):
        allow.append(t[None, :] == (t[:, None] - j + i))  # step-i key on the draft path
    ok = torch.cat(allow, dim=1)
    ok[: j - 1] = False  # positions without a full draft path get no context: masked out below
    ok[torch.arange(min(j - 1, length)), (j - 1) * length + torch.arange(min(j - 1, length))] = True
    return torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)


def pad_batch(convs: list[dict], device: str | torch.device = "cpu", target=None) -> dict | None:
    """Right-pad conversations into one batch (the conversations too short to train dropped).

    -> {tokens [B, n] x_{t+1}, features [B, n+1, d] f_t, valid [B, n] bool: the predicted token
    x_{t+2} is an assistant token}, n = longest T - 1. Right padding needs no attention mask:
    every query attends only to keys at or before its own position (see step_mask). Features
    come from the conversations (a dump) or, without them, from `target` run on the batch
    (online training: no dump)."""
    convs = [c for c in convs if c["input_ids"].numel() >= 4]
    if not convs:
        return None
    length = max(c["input_ids"].numel() for c in convs)
    ids = torch.zeros(len(convs), length, dtype=torch.long)
    valid = torch.zeros(len(convs), length - 1, dtype=torch.bool)
    for b, c in enumerate(convs):
        t = c["input_ids"].numel()
        ids[b, :t] = c["input_ids"]
        valid[b, : t - 2] = c["loss_mask"][2:].bool()
    ids = ids.to(device)
    if "features" in convs[0]:
        f = torch.zeros(len(convs), length, convs[0]["features"].shape[-1], device=device)
        for b, c in enumerate(convs):
            f[b, : c["features"].shape[0]] = c["features"].to(device, torch.float32)
    else:
        if target is None:
            raise ValueError("conversations without features need the target (online training)")
        with torch.no_grad():
            f = target.model(input_ids=ids).last_hidden_state.float()  # [B, T, d]
    return {"tokens": ids[:, 1:], "features": f, "valid": valid.to(device)}


def _step_outputs(head: CoralHead, batch: dict, steps: int):
    """Every HASS step's head outputs on a padded batch (pad_batch), with the positions each
    step trains.

    -> (f [B, n+1, d] target features, [(g_j [B, n, d], ok_j [B, n] bool) for j = 1..steps]).
    g_j keeps its graph when called with grad enabled."""
    from transformers import DynamicCache

    tokens, f, valid = batch["tokens"], batch["features"], batch["valid"]
    n = tokens.shape[1]  # positions t = 0..T-2
    pos = torch.arange(n, device=tokens.device)[None].expand(tokens.shape[0], n)
    cache = DynamicCache(config=head.config.llama_config())
    outs, prev = [], f[:, :-1]
    for j in range(1, steps + 1):
        # step 1: target features; step j: the head's own g{j-1}_{t-1} (detached)
        feats = f[:, :-1] if j == 1 else torch.cat([f[:, :1], prev[:, :-1].detach()], dim=1)
        mask = step_mask(n, j).to(tokens.device)[None, None]
        g = head(tokens, feats, pos, mask, cache)  # [B, n, d]
        ok = valid.clone()
        ok[:, : j - 1] = False
        outs.append((g, ok))
        prev = g
    return f, outs


def _losses(head: CoralHead, batch: dict, cfg: TrainConfig, distill: bool, gen: torch.Generator):
    """Loss terms on one padded batch; every term is a mean over the batch's trained positions
    (one conversation: exactly the per-conversation recipe)."""
    f, outs = _step_outputs(head, batch, cfg.steps)
    valid = outs[0][1]  # [B, n]
    if outs[-1][1].sum() == 0:
        return None
    f_next = f[:, 1:]  # [B, n, d] the step targets f_{t+1}
    with torch.no_grad():
        p_target = torch.softmax(head.full_logits(f_next[valid]), dim=-1)  # [m, V]
    total, parts = 0.0, {}
    for j, (g, ok) in enumerate(outs, start=1):
        pt = p_target[ok[valid]]  # rows of p_target for this step's valid positions
        gv = g[ok]
        reg = F.smooth_l1_loss(gv, f_next[ok])
        logq = torch.log_softmax(head.full_logits(gv), dim=-1)
        ce = -(pt * logq).sum(-1).mean()
        loss = reg + cfg.ce_weight * ce
        if distill:
            top = pt.topk(cfg.topk, dim=-1)
            loss = (
                loss + cfg.topk_weight * -(top.values * logq.gather(1, top.indices)).sum(-1).mean()
            )
        parts[f"reg{j}"] = float(reg.detach())
        parts[f"ce{j}"] = float(ce.detach())
        parts[f"acc{j}"] = float((logq.argmax(-1) == pt.argmax(-1)).float().mean())  # top-1
        total = total + loss
    if cfg.csra and len(outs) > 1:
        terms = []
        for b in range(valid.shape[0]):  # negatives: other positions of the same sequence
            idx = outs[-1][1][b].nonzero()[:, 0]  # positions valid in every step
            if idx.numel() > cfg.csra_positions:
                keep = torch.randperm(idx.numel(), generator=gen)[: cfg.csra_positions]
                idx = idx[keep.to(idx.device)]
            if idx.numel() > 1:
                terms.append(csra_loss([g[b, idx] for g, _ in outs], cfg.csra_temperature))
        if terms:
            csra = torch.stack(terms).mean()
            parts["csra"] = float(csra.detach())
            total = total + cfg.csra_weight * csra
    parts["loss"] = float(total.detach())
    return total, parts


def csra_loss(steps: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Cross-Step Representation Alignment (our reconstruction): symmetric InfoNCE between the
    L2-normalised outputs of every pair of steps; row i of each [m, d] tensor is the same
    position (the positive), the other rows are negatives."""
    z = [F.normalize(s, dim=-1) for s in steps]
    labels = torch.arange(z[0].shape[0], device=z[0].device)
    pairs = [(a, b) for a in range(len(z)) for b in range(a + 1, len(z))]
    loss = z[0].new_zeros(())
    for a, b in pairs:
        logits = z[a] @ z[b].T / temperature
        loss = loss + 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return loss / len(pairs)


@torch.no_grad()
def evaluate_loss(
    head: CoralHead, convs: list[dict], cfg: TrainConfig, target=None
) -> dict[str, float]:
    """Mean loss terms over conversations, one at a time (no top-K term, no gradient)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    sums: dict[str, float] = {}
    n = 0
    was_training = head.training
    head.eval()
    for conv in convs:
        batch = pad_batch([conv], cfg.device, target)
        res = None if batch is None else _losses(head, batch, cfg, False, gen)
        if res is None:
            continue
        n += 1
        for k, v in res[1].items():
            sums[k] = sums.get(k, 0.0) + v
    head.train(was_training)
    return {k: v / max(1, n) for k, v in sums.items()}


def _data_hash(convs: list[dict]) -> str:
    h = hashlib.sha256()
    for c in convs:
        h.update(c["input_ids"].numpy().tobytes())
    return h.hexdigest()[:16]


def load_conversations(cfg: TrainConfig, tokenizer=None) -> list[dict]:
    """The training conversations: dumped features, or (online) the sources of `cfg.data`,
    comma-separated and concatenated in order: "sharegpt" (rendered now), a pack (any name) or a
    self-distillation file (.jsonl, the target's own answers: train/selfdistill.py)."""
    if cfg.features and cfg.data:
        raise ValueError("give dumped features or online data, not both")
    if cfg.features:
        convs = [c for folder in cfg.features.split(",") for c in load_shards(folder)]
    elif cfg.data:
        convs = [c for src in cfg.data.split(",") for c in _online_source(src, cfg, tokenizer)]
    else:
        raise ValueError("no training data: give dumped features or online data")
    return convs[: cfg.max_conversations] if cfg.max_conversations else convs


def _online_source(src: str, cfg: TrainConfig, tokenizer) -> list[dict]:
    if src == "sharegpt":
        from coralline.train.data import training_examples

        if tokenizer is None:
            raise ValueError("rendering ShareGPT needs the target's tokenizer")
        examples = itertools.islice(
            training_examples(tokenizer, cfg.max_tokens), cfg.max_conversations or None
        )
    elif not Path(src).is_file():
        raise ValueError(f"training data {src!r} is not 'sharegpt' nor a file")
    elif src.endswith(".jsonl"):
        from coralline.train.selfdistill import load_examples

        examples = load_examples(src, cfg.max_tokens)
    elif zipfile.is_zipfile(src):  # a pack is an .npz (a zip), whatever its file name
        from coralline.train.data import load_pack

        return load_pack(src)[0]
    else:
        raise ValueError(
            f"unknown training data {src!r}: 'sharegpt', a pack (--write-pack) or a "
            "self-distillation file (.jsonl)"
        )
    return [
        {
            "input_ids": torch.tensor(ex.input_ids),
            "loss_mask": torch.tensor(ex.loss_mask, dtype=torch.bool),
        }
        for ex in examples
    ]


def train(cfg: TrainConfig, log=print) -> Path:
    from coralline import models

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if str(cfg.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # features and LM head: TF32 is plenty
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer = models.load(cfg.model, device=cfg.device)
    for p in target.parameters():
        p.requires_grad_(False)
    convs = load_conversations(cfg, tokenizer)
    log(f"{len(convs)} conversations, {sum(c['input_ids'].numel() for c in convs)} tokens")
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("features", "out", "device")}
    head = CoralHead(
        config_for_target(target, cfg.model, recipe=recipe, data_hash=_data_hash(convs))
    ).attach(target)
    head.norm.load_state_dict(target.model.norm.state_dict())
    head.init_groups(seed=cfg.seed)
    if cfg.init:
        warm_start(head, cfg.init, log)
    head.to(cfg.device)
    online = None if cfg.features else target
    history = fit(head, convs, cfg, out / "train_state.pt", log, target=online)
    if cfg.router:
        train_router(head, convs, cfg, log, target=online)
    head.save(out)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return out


def warm_start(head: CoralHead, folder: str | Path, log=print) -> None:
    """Load a previous head's weights (same target) before training: several short runs chain
    into a longer one. Prefers the fp32 train_state.pt of a run folder over its fp16 export."""
    folder = Path(folder)
    prev = CoralHead.load(folder)  # validates the checkpoint format
    if prev.config.target_hash != head.config.target_hash:
        raise ValueError(
            f"{folder} was trained for {prev.config.target} ({prev.config.target_hash}), "
            f"not {head.config.target} ({head.config.target_hash})"
        )
    state = prev.state_dict()
    if (folder / "train_state.pt").exists():
        fp32 = torch.load(folder / "train_state.pt", weights_only=False, map_location="cpu")["head"]
        # the router stage runs after the last train_state save: its weights come from the export
        state = {k: v if k.startswith("router.") else fp32[k] for k, v in state.items()}
    head.load_state_dict(state)
    head._grouped_rows = None  # the group order may have changed: rebuild the permuted rows
    log(f"warm start from {folder}")


def _resume_keys(config: dict) -> dict:
    """What must match to resume a run: not the device nor the time budget."""
    return {k: v for k, v in config.items() if k not in ("device", "time_limit_s")}


def fit(
    head: CoralHead,
    convs: list[dict],
    cfg: TrainConfig,
    state_path: Path | None,
    log=print,
    target=None,
) -> list[dict]:
    """Phase 1 (+ phase 2 top-K) training of the head on conversations; resumable.

    Batches of `cfg.batch` conversations, `cfg.accumulate` batches per optimizer step. Training
    progress is the larger of the share of optimizer steps done and, with `time_limit_s`, the
    share of the time budget spent: it drives the cosine learning rate and the switch to the
    top-K phase, so a run cut by its time budget still ends annealed (and is resumable)."""
    params = [p for n, p in head.named_parameters() if not n.startswith("router.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    epochs = cfg.epochs + cfg.distill_epochs
    per_step = cfg.batch * cfg.accumulate
    total_steps = math.ceil(len(convs) / per_step) * epochs
    phase2_at = cfg.epochs / epochs  # progress where the top-K phase starts

    def lr_at(progress: float) -> float:
        warm = cfg.warmup / max(1, total_steps)
        if progress < warm:
            return cfg.lr * (progress + 1 / max(1, total_steps)) / warm
        frac = (progress - warm) / max(1e-9, 1 - warm)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    step, start_epoch, start_conv, history, spent = 0, 0, 0, [], 0.0
    if state_path is not None and state_path.exists():
        st = torch.load(state_path, weights_only=False, map_location="cpu")
        if _resume_keys(st["config"]) != _resume_keys(asdict(cfg)):
            raise ValueError(f"{state_path} belongs to another training config; use another --out")
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, start_epoch, start_conv, history = st["step"], st["epoch"], st["conv"], st["history"]
        spent = st.get("seconds", 0.0)
        log(f"resuming at epoch {start_epoch}, conversation {start_conv}, step {step}")

    def save_state(epoch, conv_i):
        if state_path is None:
            return
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "config": asdict(cfg),
                "head": head.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "epoch": epoch,
                "conv": conv_i,
                "history": history,
                "seconds": elapsed(),
            },
            tmp,
        )
        tmp.replace(state_path)

    t_start = time.time()

    def elapsed() -> float:
        return spent + time.time() - t_start

    def progress() -> float:
        p = step / max(1, total_steps)
        if cfg.time_limit_s:
            p = max(p, elapsed() / cfg.time_limit_s)
        return min(1.0, p)

    gen = torch.Generator().manual_seed(cfg.seed)
    head.train()
    out_of_time = False
    for epoch in range(start_epoch, epochs):
        order = list(range(len(convs)))
        random.Random(cfg.seed + epoch).shuffle(order)
        first = start_conv if epoch == start_epoch else 0
        bar = tqdm(
            total=len(order),
            initial=first,
            desc=f"epoch {epoch + 1}/{epochs}",
            file=sys.stderr,
            unit="conv",
        )
        run, t0 = {}, time.time()
        for i, k in enumerate(range(first, len(order), cfg.batch)):
            distill = progress() >= phase2_at and cfg.distill_epochs > 0
            batch = pad_batch([convs[j] for j in order[k : k + cfg.batch]], cfg.device, target)
            res = None if batch is None else _losses(head, batch, cfg, distill, gen)
            if res is not None:
                (res[0] / cfg.accumulate).backward()
                for key, v in res[1].items():
                    run[key] = 0.98 * run.get(key, v) + 0.02 * v
            done = min(k + cfg.batch, len(order))
            bar.update(done - k)
            if (i + 1) % cfg.accumulate == 0 or done == len(order):
                for group in opt.param_groups:
                    group["lr"] = lr_at(progress())
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                shown = ("loss", "ce1", "acc1", f"acc{cfg.steps}", "csra")
                bar.set_postfix(
                    {k2: f"{v:.3f}" for k2, v in run.items() if k2 in shown}
                    | ({"phase": "top-K"} if distill else {})
                )
                if step % cfg.checkpoint_every == 0:
                    history.append(
                        {"step": step, "epoch": epoch, **run, "seconds": time.time() - t0}
                    )
                    save_state(epoch, done)
                if cfg.time_limit_s and elapsed() >= cfg.time_limit_s:
                    out_of_time = True
                    save_state(epoch, done)
                    break
        bar.close()
        if out_of_time:
            log(f"time budget ({cfg.time_limit_s:.0f} s) spent at epoch {epoch + 1}, step {step}")
            break
        save_state(epoch + 1, 0)
        log(f"epoch {epoch + 1} done: " + ", ".join(f"{k}={v:.4f}" for k, v in run.items()))
    head.eval()
    return history


def train_router(
    head: CoralHead, convs: list[dict], cfg: TrainConfig, log=print, target=None
) -> None:
    """Stage 2: the router learns each group's mass under the full LM head (head frozen)."""
    for p in head.parameters():
        p.requires_grad_(False)
    for p in head.router.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head.router.parameters(), lr=cfg.router_lr)
    groups = head.token_groups()  # [V]
    for epoch in range(cfg.router_epochs):
        subset = convs[: cfg.router_conversations] if cfg.router_conversations else convs
        bar = tqdm(
            total=len(subset),
            desc=f"router {epoch + 1}/{cfg.router_epochs}",
            file=sys.stderr,
            unit="conv",
        )
        run = None
        for k in range(0, len(subset), cfg.batch):
            bar.update(min(cfg.batch, len(subset) - k))
            batch = pad_batch(subset[k : k + cfg.batch], cfg.device, target)
            if batch is None:
                continue
            with torch.no_grad():
                _, outs = _step_outputs(head, batch, cfg.steps)
                feats = torch.cat([g[ok] for g, ok in outs])  # every step's valid outputs
                q = torch.softmax(head.full_logits(feats), dim=-1)  # [n, V]
                mass = q.new_zeros(q.shape[0], head.config.num_groups).index_add_(1, groups, q)
            loss = -(mass * torch.log_softmax(head.router_logits(feats), -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = float(loss.detach())
            run = value if run is None else 0.98 * run + 0.02 * value
            bar.set_postfix(loss=f"{run:.3f}")
        bar.close()
        log(f"router epoch {epoch + 1}: soft CE {run:.4f}")
