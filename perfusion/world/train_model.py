"""Train the embedded mini model on the miniature world (resumable, CPU-sized).

    ./dev.sh python -m perfusion.world.train_model [--world 1|2] [--steps N] [--minutes M] [--work DIR]

Every step draws a fresh batch of scenes seeded by the step number (no data set on disk), so a run
resumed from its checkpoint continues exactly. Checkpoints (model, EMA, optimizer, step) are
written atomically every 50 steps and when the time budget ends; the final EMA weights go to
perfusion/world/weights/mini.safetensors with their training configuration.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

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
# World 2's model is 3x larger and sees 30 % two- and 20 % three-object scenes (their words have to be bound to
# the right object). world -> (scenes module, U-Net config, text config, defaults, checkpoint folder)
WORLDS = {
    1: (world1, mini.UNET, mini.TEXT, DEFAULTS, Path("cache/world")),
    2: (
        world2,
        mini.UNET_W2,
        mini.TEXT_W2,
        dict(DEFAULTS, steps=12000, lr=1e-3, warmup=300, two_objects=0.3, three_objects=0.2, world=2),
        Path("cache/world2"),
    ),
}


# A run longer than a session is carried to the next in git: its checkpoint is committed here at the end
# of a session (copied from the work folder) and picked up when the work folder has none.
DIVERGED = 0.15  # a 25-step mean loss above this and 3x the recent best means the run blew up
CARRIED = {2: Path(__file__).with_name("weights") / "mini2.checkpoint.safetensors"}


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    progress = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


@torch.no_grad()
def debiased_ema(ema: torch.nn.Module, init: torch.nn.Module, decay: float, steps: int) -> torch.nn.Module:
    """The EMA without the weight its starting point (the random init) still has after `steps`:
    (ema - decay^steps * init) / (1 - decay^steps), parameter by parameter (Adam's bias correction)."""
    left = decay**steps
    for e, i in zip(ema.parameters(), init.parameters()):
        e.sub_(i, alpha=left).div_(1 - left)
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
    state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, field = key.split(".", 2)
            state["state"].setdefault(int(idx), {})[field] = value[0] if field == "step" else value
    opt.load_state_dict(state)
    return int(meta["step"]), json.loads(meta["config"]), json.loads(meta["log"]), float(meta.get("lr_scale", 1.0))


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


def train(steps: int, minutes: float, work: Path, out: Path, world: int = 1, **overrides) -> int:
    """Train (or continue) until `steps` or the time budget; returns the step reached."""
    scenes, unet_config, text_config, defaults, _ = WORLDS[world]
    cfg = {**defaults, **overrides, "steps": steps}
    models, params, opt = _models(cfg, unet_config, text_config)
    unet, text = models["unet"], models["text"]
    ckpt = work / "mini.checkpoint.safetensors"
    previous = work / "mini.checkpoint.prev.safetensors"  # the one before: where the divergence guard goes back to
    step, log, lr_scale = 0, [], 1.0
    carried = CARRIED.get(world)
    if not ckpt.exists() and carried is not None and carried.exists():  # a run that a session carried over in git
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(carried, ckpt)
        print(f"continuing the run carried in {carried}", flush=True)
    if ckpt.exists():
        step, saved, log, lr_scale = load_checkpoint(ckpt, models, opt)
        if {k: v for k, v in saved.items() if k != "steps"} != {k: v for k, v in cfg.items() if k != "steps"}:
            raise SystemExit(
                f"{ckpt} was made with another configuration ({saved}); delete it or pass the same options"
            )
        print(f"resuming at step {step}/{steps}", flush=True)
    tokenizer = load_tokenizer()
    alphas = mini.cosine_alphas_cumprod()
    unet.train()
    text.train()
    deadline = time.monotonic() + minutes * 60
    started, window = time.monotonic(), []
    layout = {k: cfg[k] for k in ("two_objects", "three_objects") if k in cfg}  # world 1 has no three-object scenes
    while step < steps and time.monotonic() < deadline:
        images, captions, _ = scenes.batch(
            cfg["seed"] * 1_000_003 + step, cfg["batch"], scenes.PATTERNS, drop_caption=cfg["drop_caption"], **layout
        )
        gen = torch.Generator().manual_seed(cfg["seed"] * 7_919 + step)
        x0 = to_tensor(images)
        t = torch.randint(len(alphas), (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        context = mini.encode_captions((tokenizer, text), captions)
        pred = unet(q_sample(x0, t, noise, alphas), t, context=context)
        loss = (pred - training_target(x0, t, noise, alphas, "v")).square().mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * lr_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for src, dst in (("unet", "ema_unet"), ("text", "ema_text")):
                for p, e in zip(models[src].parameters(), models[dst].parameters()):
                    e.lerp_(p, 1 - cfg["ema"])
        step += 1
        window.append(loss.item())
        if step % 25 == 0 or step == steps:
            rate = (time.monotonic() - started) / len(window) if window else 0
            mean = sum(window[-25:]) / len(window[-25:])
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
                continue
            log.append([step, mean])
            print(f"step {step}/{steps} loss {mean:.4f} ({rate:.2f} s/step)", flush=True)
        if step % 50 == 0:
            if ckpt.exists():
                os.replace(ckpt, previous)
            save_checkpoint(ckpt, models, opt, step, cfg, log, lr_scale)
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
    a = p.parse_args()
    _, _, _, defaults, work = WORLDS[a.world]
    out = a.out or (mini.WEIGHTS if a.world == 1 else mini.WEIGHTS.with_name("mini2.safetensors"))
    if a.export:
        print(f"wrote {out} at step {export_checkpoint(a.work or work, out, a.world)}")
        return
    train(a.steps or defaults["steps"], a.minutes, a.work or work, out, a.world, token_scale=a.token_scale)


if __name__ == "__main__":
    main()
