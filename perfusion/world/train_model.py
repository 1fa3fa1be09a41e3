"""Train the embedded mini model on the miniature world (resumable, CPU-sized).

    ./dev.sh python -m perfusion.world.train_model [--world 1|2] [--steps N] [--minutes M] [--work DIR]
        [--device cuda --batch 128 --workers 15] [--restart --lr L --warmup W [--by-time]]

Every step draws a fresh batch of scenes seeded by the step number (no data set on disk), so a run
resumed from its checkpoint continues exactly. Checkpoints (model, EMA, optimizer, step) are
written atomically every 50 steps (--checkpoint-every) and when the time budget ends; the final EMA
weights go to perfusion/world/weights/mini.safetensors with their training configuration.

--restart goes on from a checkpoint's weights with another batch, learning rate or length: a new
warm-up and cosine start at the step reached (a warm restart). --by-time runs that cosine over the
time budget instead of the steps (a lent accelerator whose speed is not known in advance); the run
then ends, and exports, where the budget does. --workers renders the scenes in that many processes.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import itertools
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from ..clip_tokenizer import load_tokenizer
from ..diffusion import q_sample, training_target
from ..files import atomic_write
from . import model as mini
from . import scenes as world1
from .scenes import to_tensor
from .w2 import scenes as world2

# The text encoder stays at its seeded random init (as Stable Diffusion keeps CLIP frozen): trained jointly,
# this 64-wide encoder collapsed every word but the last one (the background) to nearly the same encoding.
DEFAULTS = dict(
    steps=3600,
    batch=32,
    lr=2e-3,
    warmup=100,
    ema=0.999,
    drop_caption=0.1,
    two_objects=0.25,
    seed=0,
    train_text=False,
    token_scale=10.0,
)
# World 2's options added after its first runs, at their defaults: a checkpoint from before them was trained so
WORLD2_ADDED = {"colourless": 0.0, "object_weight": 0.0}
# World 2's model is 3x larger and sees 30 % two- and 20 % three-object scenes (their words have to be bound to
# the right object). world -> (scenes module, U-Net config, text config, defaults, checkpoint folder)
WORLDS = {
    1: (world1, mini.UNET, mini.TEXT, DEFAULTS, Path("cache/world")),
    2: (
        world2,
        mini.UNET_W2,
        mini.TEXT_W2,
        dict(DEFAULTS, steps=12000, lr=1e-3, warmup=300, two_objects=0.3, three_objects=0.2, world=2, **WORLD2_ADDED),
        Path("cache/world2"),
    ),
}


DIVERGED = 0.15  # a 25-step mean loss above this and 3x the recent best means the run blew up


# What a warm restart may change (anything else would make the checkpoint another model's).
RESTARTABLE = (
    "steps",
    "batch",
    "lr",
    "warmup",
    "restart_at",
    "colourless",
    "two_objects",
    "three_objects",
    "object_weight",
)


def weighted_loss(error: torch.Tensor, cover: Optional[torch.Tensor], object_weight: float) -> torch.Tensor:
    """The squared error [B, C, H, W] averaged with each pixel weighing 1 + object_weight x how much of it the
    scene's objects cover (`cover` [B, H, W], 0..1). A small object is 8 % of a 48-px scene and its pattern's
    accent a third to a half of that, so a plain mean spends the loss on backgrounds the model already draws
    right; object_weight 0 (or no cover) is the plain mean."""
    if cover is None or not object_weight:
        return error.square().mean()
    weight = (1 + object_weight * cover.to(error))[:, None].expand_as(error)
    return (weight * error.square()).sum() / weight.sum()


def lr_at(step: int, cfg: dict, progress: Optional[float] = None) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak, from the last restart (step 0 if none);
    progress: where in the cosine the run is, 0..1, if not counted in steps (--by-time)."""
    local = step - cfg.get("restart_at", 0)
    if local < cfg["warmup"]:
        return cfg["lr"] * (local + 1) / cfg["warmup"]
    if progress is None:
        progress = (local - cfg["warmup"]) / max(1, cfg["steps"] - cfg.get("restart_at", 0) - cfg["warmup"])
    progress = min(max(progress, 0.0), 1.0)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(progress * math.pi)))


@torch.no_grad()
def debiased_ema(ema: torch.nn.Module, init: torch.nn.Module, decay: float, steps: int) -> torch.nn.Module:
    """The EMA without the weight its starting point (the random init) still has after `steps`:
    (ema - decay^steps * init) / (1 - decay^steps), parameter by parameter (Adam's bias correction)."""
    left = decay**steps
    for e, i in zip(ema.parameters(), init.parameters()):
        e.sub_(i.to(e.device), alpha=left).div_(1 - left)
    return ema


def save_checkpoint(
    path: Path, models: dict, opt: torch.optim.Optimizer, step: int, cfg: dict, log: list, lr_scale: float = 1.0
) -> None:
    """Everything that changes while training, atomically (a frozen text encoder is rebuilt from its seed);
    lr_scale: what the divergence guard has cut the learning rate to."""
    tensors = {
        f"{name}.{k}": v.detach().contiguous()
        for name, m in models.items()
        for k, v in m.state_dict().items()
        if cfg["train_text"] or "text" not in name
    }
    state = opt.state_dict()
    for idx, s in state["state"].items():
        for key, value in s.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" else value.contiguous()
    meta = {"step": str(step), "config": json.dumps(cfg), "log": json.dumps(log[-200:]), "lr_scale": repr(lr_scale)}
    atomic_write(path, save_bytes(tensors, metadata=meta))


def load_checkpoint(path: Path, models: dict, opt: torch.optim.Optimizer) -> tuple[int, dict, list, float]:
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for name, m in models.items():
        saved = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if saved:  # a frozen text encoder is not saved: it stays as built from the seed
            m.load_state_dict(saved)
    for name in ("unet", "text"):  # a slim checkpoint without the EMA: the EMA starts at the weights
        if not any(k.startswith(f"ema_{name}.") for k in tensors):
            models[f"ema_{name}"].load_state_dict(models[name].state_dict())
    state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, field = key.split(".", 2)
            state["state"].setdefault(int(idx), {})[field] = value[0] if field == "step" else value
    opt.load_state_dict(state)
    return int(meta["step"]), json.loads(meta["config"]), json.loads(meta["log"]), float(meta.get("lr_scale", 1.0))


def load_weights(path: Path, models: dict) -> tuple[int, dict, list]:
    """An exported weights file as the starting point of a warm restart: its EMA U-Net becomes the weights
    and the EMA, its text encoder both encoders; (step, training config, log) from its metadata. This is how
    a run goes on in a later session or on another machine without carrying an optimizer's checkpoint."""
    tensors = load_file(str(path))
    meta = mini.weights_meta(path)
    for name in ("unet", "text"):
        own = {k[len(name) + 1 :]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
        models[name].load_state_dict(own)
        models[f"ema_{name}"].load_state_dict(own)
    log = [[meta["steps"], meta["final_loss"]]] if meta.get("final_loss") is not None else []
    return int(meta["steps"]), meta["config"]["train"], log


def slim(src: Path, dst: Path, world: int, parts: tuple[str, ...] = ("unet", "ema_unet", "text")) -> Path:
    """A checkpoint without the optimizer's moments (and what `parts` leaves out), to carry a run to a
    machine or a session where size counts: it resumes with fresh moments (--restart gives them a warm-up).
    The frozen text encoder is written too: that pins it, whatever a library version builds from the seed."""
    _, unet_config, text_config, defaults, _ = WORLDS[world]
    models, _, opt = _models(defaults, unet_config, text_config)
    step, cfg, log, lr_scale = load_checkpoint(src, models, opt)
    tensors = {f"{name}.{k}": v.contiguous() for name in parts for k, v in models[name].state_dict().items()}
    meta = {"step": str(step), "config": json.dumps(cfg), "log": json.dumps(log[-200:]), "lr_scale": repr(lr_scale)}
    return atomic_write(dst, save_bytes(tensors, metadata=meta))


def _models(cfg: dict, unet_config: dict, text_config: dict) -> tuple[dict, list, torch.optim.Optimizer]:
    """(models {unet, text, ema_unet, ema_text}, trained parameters, optimizer) at their seeded init."""
    torch.manual_seed(cfg["seed"])
    unet, text = mini.build(cfg["seed"], unet_config, text_config, token_scale=cfg["token_scale"])
    models = {"unet": unet, "text": text, "ema_unet": copy.deepcopy(unet), "ema_text": copy.deepcopy(text)}
    for name in ("ema_unet", "ema_text"):
        models[name].requires_grad_(False)
    text.requires_grad_(cfg["train_text"])
    params = list(unet.parameters()) + (list(text.parameters()) if cfg["train_text"] else [])
    return models, params, torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01)


def export(models: dict, cfg: dict, configs: tuple[dict, dict], step: int, log: list, out: Path) -> Path:
    """The bias-corrected EMA weights at `step`, with their configuration, to `out` (atomically)."""
    unet_config, text_config = configs
    meta = {
        "config": {"unet": unet_config, "text": text_config, "train": cfg, "zero_padding": True},
        "steps": step,
        "final_loss": log[-1][1] if log else None,
        "ema": "bias-corrected",
    }
    init_unet, init_text = mini.build(cfg["seed"], unet_config, text_config, token_scale=cfg["token_scale"])
    ema_unet, ema_text = copy.deepcopy(models["ema_unet"]), copy.deepcopy(models["ema_text"])
    return mini.save_weights(
        debiased_ema(ema_unet, init_unet, cfg["ema"], step),
        debiased_ema(ema_text, init_text, cfg["ema"], step),
        out,
        meta,
    )


def export_checkpoint(work: Path, out: Path, world: int) -> int:
    """Export the EMA of a checkpoint as it stands (also while its run goes on: saves are atomic)."""
    _, unet_config, text_config, defaults, _ = WORLDS[world]
    ckpt = work / "mini.checkpoint.safetensors"
    models, _, opt = _models(defaults, unet_config, text_config)
    step, cfg, log, _ = load_checkpoint(ckpt, models, opt)
    export(models, cfg, (unet_config, text_config), step, log, out)
    return step


def _batches(world: int, cfg: dict, first: int, length: int, workers: int) -> Iterator[tuple]:
    """(images uint8 [B, H, W, 3], token ids [B, length], object cover float [B, H, W] or None where the loss does
    not weigh objects) for steps first, first + 1, ...; rendered in
    `workers` processes, at most two batches per worker ahead of the step that needs them (0: here)."""
    if workers <= 0:
        yield from (_batch(world, cfg, length, step) for step in itertools.count(first))
        return
    # spawn: the workers share nothing with a process that holds an accelerator
    with mp.get_context("spawn").Pool(workers) as pool:
        ahead: collections.deque = collections.deque()
        for step in itertools.count(first):
            while len(ahead) < 2 * workers:
                ahead.append(pool.apply_async(_batch, (world, cfg, length, step + len(ahead))))
            yield ahead.popleft().get()


def _batch(world: int, cfg: dict, length: int, step: int) -> tuple[np.ndarray, torch.Tensor, Optional[np.ndarray]]:
    scenes = WORLDS[world][0]
    # world 1 has no three-object scenes and names every colour
    layout = {k: cfg[k] for k in ("two_objects", "three_objects", "colourless") if k in cfg}
    drawn, captions = scenes.scenes_and_captions(
        cfg["seed"] * 1_000_003 + step, cfg["batch"], scenes.PATTERNS, drop_caption=cfg["drop_caption"], **layout
    )
    ids = mini.tokenize(_tokenizer(), captions, length)
    if not cfg.get("object_weight"):  # the loss needs no cover (and world 1 draws none)
        return np.stack([scenes.render(s) for s in drawn]), ids, None
    images, cover = zip(*(scenes.render_with_cover(s) for s in drawn))
    return np.stack(images), ids, np.stack(cover)


@functools.cache
def _tokenizer():
    return load_tokenizer()


def train(
    steps: int,
    minutes: float,
    work: Path,
    out: Path,
    world: int = 1,
    device: str = "cpu",
    workers: int = 0,
    restart: bool = False,
    by_time: bool = False,
    checkpoint_every: int = 50,
    **overrides,
) -> int:
    """Train (or continue) until `steps` or the time budget; returns the step reached."""
    _, unet_config, text_config, defaults, _ = WORLDS[world]
    cfg = {**defaults, **overrides, "steps": steps}
    models, params, opt = _models(cfg, unet_config, text_config)
    for m in models.values():  # before a checkpoint loads: the optimizer's moments follow the weights' device
        m.to(device)
    ckpt = work / "mini.checkpoint.safetensors"
    previous = work / "mini.checkpoint.prev.safetensors"  # the one before: where the divergence guard goes back to
    step, log, lr_scale, saved, source = 0, [], 1.0, None, ckpt
    if ckpt.exists():
        step, saved, log, lr_scale = load_checkpoint(ckpt, models, opt)
    elif restart and out.exists():  # no run under way: go on from the exported weights
        step, saved, log = load_weights(out, models)
        source = out
    elif restart:  # a warm restart from nothing would silently train a new model from scratch
        raise SystemExit(f"--restart found neither {ckpt} nor {out}: copy the weights to go on from to {out}")
    if saved is not None:
        if world == 2:  # a checkpoint from before an option was trained as its default is now
            saved = {**WORLD2_ADDED, **saved}
        if restart:  # a warm restart: new schedule from here, the learning rate guard's cut forgotten
            cfg["restart_at"], lr_scale = step, 1.0
        elif "restart_at" in saved:
            cfg["restart_at"] = saved["restart_at"]
        may_differ = RESTARTABLE if restart else ("steps",)
        if {k: v for k, v in saved.items() if k not in may_differ} != {
            k: v for k, v in cfg.items() if k not in may_differ
        }:
            raise SystemExit(
                f"{source} was made with another configuration ({saved}); delete it or pass the same options"
            )
        print(f"{'restarting' if restart else 'resuming'} from {source} at step {step}/{steps}", flush=True)
    alphas = mini.cosine_alphas_cumprod().to(device)
    if device.startswith("cuda"):  # fixed shapes: let cuDNN pick its fastest kernels; TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    unet, text = models["unet"], models["text"]
    unet.train()
    text.train()
    trained = [(list(models[src].parameters()), list(models[f"ema_{src}"].parameters())) for src in ("unet", "text")]
    started = time.monotonic()
    deadline = started + minutes * 60
    window: list[torch.Tensor] = []
    first = step
    batches = _batches(world, cfg, step, text.config.max_position_embeddings, workers)
    while step < steps and time.monotonic() < deadline:
        images, ids, cover = next(batches)
        gen = torch.Generator(device).manual_seed(cfg["seed"] * 7_919 + step)
        x0 = to_tensor(images).to(device, non_blocking=True)
        t = torch.randint(len(alphas), (len(x0),), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        context = mini.encode_ids(text, ids)
        pred = unet(q_sample(x0, t, noise, alphas), t, context=context)
        error = pred - training_target(x0, t, noise, alphas, "v")
        loss = weighted_loss(error, None if cover is None else torch.from_numpy(cover), cfg.get("object_weight", 0.0))
        progress = (time.monotonic() - started) / (deadline - started) if by_time else None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, progress) * lr_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for weights, ema in trained:
                torch._foreach_lerp_(ema, weights, 1 - cfg["ema"])
        step += 1
        window.append(loss.detach())  # read every 25 steps: no device sync per step
        if step % 25 == 0 or step == steps:
            rate = (time.monotonic() - started) / (step - first)
            mean = torch.stack(window[-25:]).mean().item()
            window.clear()
            recent = [m for _, m in log[-4:]]
            if recent and mean > max(DIVERGED, 3 * min(recent)):
                # diverged (seen once: a 5.4M U-Net at lr 1.5e-3 fell back to its initial loss within 25 steps
                # and stayed): back to the checkpoint before the last one, at half the learning rate
                back = previous if previous.exists() else ckpt
                cut = lr_scale * 0.5  # the cut so far, whatever the checkpoint gone back to was saved with
                step, _, log, _ = load_checkpoint(back, models, opt)
                lr_scale = cut
                if lr_scale < 0.1:  # not the learning rate, then: stop rather than go round for ever
                    raise SystemExit(f"diverged again at step {step} with the learning rate cut to x{lr_scale * 2:g}")
                print(
                    f"loss {mean:.4f} after {min(recent):.4f}: diverged; back to step {step}, learning rate "
                    f"x{lr_scale:g}",
                    flush=True,
                )
                batches.close()
                batches = _batches(world, cfg, step, text.config.max_position_embeddings, workers)
                continue
            log.append([step, mean])
            print(f"step {step}/{steps} loss {mean:.4f} ({rate:.3f} s/step)", flush=True)
        if step % checkpoint_every == 0:
            if ckpt.exists():
                os.replace(ckpt, previous)
            save_checkpoint(ckpt, models, opt, step, cfg, log, lr_scale)
    batches.close()
    if by_time:  # the cosine ran over the budget: the run is complete where the budget ended
        cfg["steps"] = steps = step
    save_checkpoint(ckpt, models, opt, step, cfg, log, lr_scale)
    if step >= steps:
        export(models, cfg, (unet_config, text_config), step, log, out)
        print(f"wrote {out}", flush=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--world",
        type=int,
        choices=sorted(WORLDS),
        default=1,
        help="1: the 32x32 world of the committed weights; 2: the 48x48 two-colour world",
    )
    p.add_argument("--steps", type=int, help="default: the world's (3,600 / 12,000)")
    p.add_argument("--minutes", type=float, default=90.0, help="stop (resumably) after this long")
    p.add_argument("--work", type=Path, help="checkpoint folder (default cache/world, cache/world2)")
    p.add_argument("--out", type=Path, help="weights file (default perfusion/world/weights/mini[2].safetensors)")
    p.add_argument(
        "--token-scale",
        type=float,
        default=DEFAULTS["token_scale"],
        help="scale of the frozen encoder's random token table (see model.build)",
    )
    p.add_argument("--export", action="store_true", help="only write the checkpoint's EMA weights as they stand")
    p.add_argument("--slim", type=Path, help="only write the checkpoint without optimizer moments to this file")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="processes rendering scenes ahead (0: in the loop)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--restart", action="store_true", help="warm restart: new warm-up and cosine from here")
    p.add_argument("--by-time", action="store_true", help="with --restart: the cosine spans --minutes")
    for name in ("batch", "warmup"):
        p.add_argument(f"--{name}", type=int, help="default: the world's (may change only with --restart)")
    p.add_argument("--lr", type=float, help="default: the world's (may change only with --restart)")
    p.add_argument(
        "--object-weight",
        type=float,
        help="world 2: extra loss weight of the pixels objects cover (default 0: a plain mean; may change only "
        "with --restart)",
    )
    p.add_argument(
        "--colourless",
        type=float,
        help="world 2: how often a caption leaves an object's colour out (default 0; may change only with --restart)",
    )
    for name in ("two-objects", "three-objects"):
        p.add_argument(
            f"--{name}",
            type=float,
            help=f"world 2: the share of scenes with {name.replace('-', ' ')} (default 0.3 / 0.2; "
            "may change only with --restart)",
        )
    a = p.parse_args()
    _, _, _, defaults, work = WORLDS[a.world]
    work = a.work or work
    out = a.out or (mini.WEIGHTS if a.world == 1 else mini.WEIGHTS.with_name("mini2.safetensors"))
    if a.export:
        print(f"wrote {out} at step {export_checkpoint(work, out, a.world)}")
        return
    if a.slim:
        print(f"wrote {slim(work / 'mini.checkpoint.safetensors', a.slim, a.world)}")
        return
    shares = {k: getattr(a, k) for k in ("colourless", "two_objects", "three_objects") if getattr(a, k) is not None}
    if a.object_weight is not None and (a.world != 2 or a.object_weight < 0):
        p.error("--object-weight is world 2's, 0 or more")
    if shares and a.world != 2:
        p.error(f"--{next(iter(shares)).replace('_', '-')} is world 2's")
    for key, value in shares.items():
        if not 0.0 <= value <= 1.0:
            p.error(f"--{key.replace('_', '-')} is a probability, 0 to 1 (got {value})")
    if a.world == 2 and sum(shares.get(k, defaults[k]) for k in ("two_objects", "three_objects")) > 1.0:
        p.error("--two-objects and --three-objects are shares of the scenes: together at most 1")
    if a.by_time and not a.restart:
        p.error("--by-time needs --restart (it reshapes the schedule from the step reached)")
    tuned = {k: getattr(a, k) for k in ("batch", "warmup", "lr", "object_weight") if getattr(a, k) is not None}
    tuned |= shares
    train(
        a.steps or defaults["steps"],
        a.minutes,
        work,
        out,
        a.world,
        device=a.device,
        workers=a.workers,
        restart=a.restart,
        by_time=a.by_time,
        checkpoint_every=a.checkpoint_every,
        token_scale=a.token_scale,
        **tuned,
    )


if __name__ == "__main__":
    main()
