"""Learn one concept from a few images (Perfusion, or Infusion), through any `Adapter`.

Perfusion: a new word whose input embedding starts at the superclass word's; keys locked to the
superclass (o*_K = W_K i_super); value targets o*_V (one vector per attn2) and the embedding are
trained with AdamW in two parameter groups; i* follows the concept word's encoding by EMA.
Infusion: the class word itself, keys untouched, a gated value residual per attn2.

Every random draw of micro-batch (step, k) comes from a generator seeded by (seed, step, k), so an
interrupted run resumed from its checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from .adapter import Adapter, encode_by_size
from .checkpointing import checkpointed_blocks
from .concept import Concept, save_concept
from .covariance import Covariance, concept_gate
from .dataset import by_size, soft_mask
from .diffusion import q_sample, training_target
from .files import atomic_write, read_regular
from .hooks import Activation, attach
from .masks import fill_attention_masks
from .options import (
    BETA,
    I_STAR_GRADIENTS,
    LR_SCHEDULES,
    METHODS,
    TAU,
    TRAIN_BETA,
    TRAIN_LOCKS,
    TRAIN_TAU,
    IStarGradient,
    Keys,
    LrSchedule,
    Method,
    TrainLock,
)

MAX_TEMPLATES_BYTES = 256 * 2**10
TI_TEMPLATES = (
    "a photo of a [name]",
    "a rendering of a [name]",
    "a cropped photo of the [name]",
    "the photo of a [name]",
    "a photo of a clean [name]",
    "a photo of a dirty [name]",
    "a dark photo of the [name]",
    "a photo of my [name]",
    "a photo of the cool [name]",
    "a close-up photo of a [name]",
    "a bright photo of the [name]",
    "a cropped photo of a [name]",
    "a photo of the [name]",
    "a good photo of the [name]",
    "a photo of one [name]",
    "a close-up photo of the [name]",
    "a rendition of the [name]",
    "a photo of the clean [name]",
    "a rendition of a [name]",
    "a photo of a nice [name]",
    "a good photo of a [name]",
    "a photo of the nice [name]",
    "a photo of the small [name]",
    "a photo of the weird [name]",
    "a photo of the large [name]",
    "a photo of a cool [name]",
    "a photo of a small [name]",
)


@dataclass
class _Clock:
    """Steps per second since the run (re)started, and the smoothed loss the progress line shows."""

    first_step: int
    smoothed: Optional[float] = None
    started: float = field(default_factory=time.monotonic)

    def smooth(self, loss: float) -> float:
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        return self.smoothed

    def rate(self, step: int) -> float:
        return (step - self.first_step) / max(time.monotonic() - self.started, 1e-9)


@dataclass
class TrainState:
    """What a run changes: the learned tensors (values, trained keys, embedding), the EMA of i*, and the step.
    A checkpoint holds exactly this and the optimizer's moments."""

    step: int
    i_super: torch.Tensor  # [d]
    i_star: torch.Tensor  # [d]
    values: dict[str, torch.Tensor]  # {layer: [d_out]}
    keys: dict[str, torch.Tensor]  # {layer: [d_out]}, only when keys are trained
    embedding: dict[str, torch.Tensor]  # {text encoder: [n, d_emb]}

    TABLES = ("values", "keys", "embedding")

    def params(self) -> dict[str, torch.Tensor]:
        """The optimised tensors by checkpoint name ("values.<layer>", "keys.<layer>", "embedding.<encoder>")."""
        return {f"{table}.{k}": v for table in self.TABLES for k, v in getattr(self, table).items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything but the step, detached on the CPU (a checkpoint's tensors)."""
        out = {name: p.detach().cpu().contiguous() for name, p in self.params().items()}
        return out | {"i_star": self.i_star.detach().cpu(), "i_super": self.i_super.detach().cpu()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], step: int, device) -> TrainState:
        tables = {table: {} for table in cls.TABLES}
        for name, t in tensors.items():
            table, _, key = name.partition(".")
            if table in tables:
                tables[table][key] = t.to(device)
        return cls(step, tensors["i_super"].to(device), tensors["i_star"].to(device), **tables)

    def trainable(self) -> None:
        """The optimised tensors as fp32 leaves that require gradients."""
        for table in self.TABLES:
            t = getattr(self, table)
            for k in t:
                t[k] = t[k].detach().float().requires_grad_(True)


class TrainError(ValueError):
    """Training cannot start or resume; the message says what to change."""


class NonFiniteError(TrainError):
    """A micro-step met NaN or Inf (in the text encoding or the loss); the run stops before applying it, so
    the concept and checkpoint on disk keep the last finite step. `where`: "text encoder" or "loss"."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


MAY_CHANGE = {"may_change_on_resume": True}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in its checkpoint)."""

    # fields marked MAY_CHANGE can differ when a run is resumed; every other one defines the run
    name: str = field(metadata=MAY_CHANGE)
    token: str
    superclass: str
    method: Method = "perfusion"
    steps: int = field(default=400, metadata=MAY_CHANGE)
    batch_size: int = 4
    grad_accum: int = 4
    lr_values: float = field(default=0.03, metadata=MAY_CHANGE)
    lr_embedding: float = field(default=0.006, metadata=MAY_CHANGE)
    warmup_steps: int = field(default=0, metadata=MAY_CHANGE)
    lr_schedule: LrSchedule = field(default="constant", metadata=MAY_CHANGE)
    train_beta: float = field(default=TRAIN_BETA, metadata=MAY_CHANGE)
    train_tau: float = field(default=TRAIN_TAU, metadata=MAY_CHANGE)
    beta: float = field(default=BETA, metadata=MAY_CHANGE)  # previews
    tau: float = field(default=TAU, metadata=MAY_CHANGE)
    ema: Optional[float] = 0.99
    i_star_gradient: IStarGradient = "detach"
    # ablations (the paper's and the benchmark's baselines): trained instead of locked keys, an
    # ungated (ROME) edit, or no edit at all (textual inversion: only the embedding learns)
    keys: Keys = "locked"
    lock: TrainLock = "local"  # hard: the key row held at W_K i_super while training (options.TrainLock)
    # confine: every context row but the word's own is the superclass prompt's encoding, so the identity cannot
    # ride on the rows a causal text encoder spreads the learned word over (apply with generate(confine=True))
    confine: bool = False
    gated: bool = True
    edit: bool = True
    templates: tuple[str, ...] = field(default=TI_TEMPLATES, metadata=MAY_CHANGE)
    flip: bool = True
    save_every: int = field(default=0, metadata=MAY_CHANGE)
    preview_every: int = field(default=0, metadata=MAY_CHANGE)
    seed: int = 0
    clip_skip: int = field(default=1, metadata=MAY_CHANGE)
    # recompute U-Net blocks in backward: less memory, ~30 % slower
    gradient_checkpointing: bool = field(default=False, metadata=MAY_CHANGE)

    @classmethod
    def fixed_on_resume(cls) -> list[str]:
        """The fields a resumed run must share with its checkpoint."""
        return [f.name for f in fields(cls) if not f.metadata.get("may_change_on_resume")]

    def check(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise TrainError("warmup_steps must be 0 or more")
        if self.i_star_gradient not in I_STAR_GRADIENTS:
            raise TrainError(f"i_star_gradient must be one of {', '.join(I_STAR_GRADIENTS)}")
        if min(self.steps, self.batch_size, self.grad_accum) < 1:
            raise TrainError("steps, batch size and gradient accumulation must be at least 1")
        if not all(takes_the_word(t) for t in self.templates):
            raise TrainError(
                "every template line needs a [name] placeholder (or [filewords], its captions holding [name])"
            )
        if not self.tau > 0 or not self.train_tau > 0:
            raise TrainError("tau must be positive")
        if self.keys not in ("locked", "trained"):
            raise TrainError("keys must be 'locked' or 'trained'")
        if self.lock not in TRAIN_LOCKS:
            raise TrainError(f"lock must be one of {', '.join(TRAIN_LOCKS)}, got {self.lock!r}")
        if self.method == "infusion" and (self.keys == "trained" or not self.edit):
            raise TrainError("Infusion keeps keys untouched and always edits values")


@dataclass
class Progress:
    """One report per optimiser step."""

    step: int
    total: int
    loss: float
    smoothed: float
    eta_s: float
    it_per_s: float
    lr_values: float = 0.0  # the learning rates this step used (after warm-up and schedule)
    lr_embedding: float = 0.0
    superclass_similarity: float = 0.0  # a . i_super: the superclass word opens the gate when it nears beta


@dataclass
class TrainResult:
    concept: Concept
    path: Path
    step: int
    interrupted: bool
    losses: list[float] = field(default_factory=list)


def takes_the_word(template: str) -> bool:
    """A template line places the word itself ([name]) or through its captions ([filewords] holding [name])."""
    return "[name]" in template or "[filewords]" in template


def captions_without_the_word(templates: Sequence[str], captions: Sequence[str]) -> list[int]:
    """Indices of the captions that leave a template without [name] with no word ([] when every template has
    [name], which then need no caption to hold it)."""
    if all("[name]" in t for t in templates):
        return []
    return [i for i, c in enumerate(captions) if "[name]" not in c]


def fill_template(template: str, word: str, caption: str) -> str:
    """A training prompt: [filewords] replaced by the image's caption first, then [name] by `word`, as the WebUI's
    textual-inversion dataset does, so a caption may place the word itself ("a small [name] at the left")."""
    return " ".join(template.replace("[filewords]", caption).replace("[name]", word).split())


def mirror_caption(caption: str) -> str:
    """The caption of a mirrored photo: "left" and "right" swapped as whole words, case kept ("a small [name] at
    the left" -> "... at the right"), so a flipped copy is not taught to draw the object where the caption is not."""

    def swap(m: re.Match) -> str:
        word = "right" if m[0].lower() == "left" else "left"
        return word.upper() if m[0].isupper() else word.capitalize() if m[0][0].isupper() else word

    return re.sub(r"\b(left|right)\b", swap, caption, flags=re.IGNORECASE)


def read_templates(path: str | Path) -> tuple[str, ...]:
    """Template lines from a textual-inversion style file ([name] and/or [filewords]); blank lines skipped."""
    path = Path(path)
    try:
        text = read_regular(path, MAX_TEMPLATES_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError):  # one message for every cause: it does not tell which paths exist
        raise TrainError(
            f"{path}: cannot read it as a UTF-8 text file of at most {MAX_TEMPLATES_BYTES // 1024} KB"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [n for n, line in enumerate(lines, 1) if not takes_the_word(line)]
    if not lines or bad:
        raise TrainError(
            f"{path}: every line needs a [name] placeholder (or [filewords], the captions holding [name])"
            + (f" (line {bad[0]} has none)" if bad else " (file is empty)")
        )
    return tuple(lines)


def check_superclass(adapter: Adapter, superclass: str) -> None:
    """The superclass must be exactly one token; otherwise say which words would do."""
    n = adapter.token_count(superclass)
    if n == 1:
        return
    words = [w for w in superclass.replace("-", " ").split() if adapter.token_count(w) == 1]
    hint = (
        f"try one of: {', '.join(words)}"
        if words
        else "try a common one-word class such as 'toy', 'dog', 'cat', 'person'"
    )
    raise TrainError(f"superclass {superclass!r} is {n} tokens, it must be exactly one; {hint}")


def loss_scaler(unet: torch.nn.Module) -> torch.amp.GradScaler:
    """Dynamic loss scaling for a half-precision U-Net on CUDA (the concept's tensors stay fp32, but their
    gradients pass through fp16 activations, where small ones would flush to zero); a no-op otherwise."""
    p = next(unet.parameters())
    return torch.amp.GradScaler(p.device.type, enabled=p.device.type == "cuda" and p.dtype == torch.float16)


class Trainer:
    """One run. `images` [N, 3, R, R] in [-1, 1], or a list of [3, H, W] of several sizes (aspect-ratio
    buckets: a micro-batch holds images of one size); `masks`: per image an [H, W] weight in [0, 1], None (no
    mask) or "attention" (the model's own cross-attention on the superclass word, the paper's zero-shot
    object mask); or "attention" for every image, or None for no mask at all. `resolution`: the run's
    nominal size in px for its metadata (default: the side of the largest image's area)."""

    def __init__(
        self,
        adapter: Adapter,
        covariance: Covariance,
        config: TrainConfig,
        images: Union[torch.Tensor, list[torch.Tensor]],
        masks: Union[None, str, list[Union[None, str, torch.Tensor]]],
        work_dir: str | Path,
        concept_path: str | Path,
        captions: Optional[list[str]] = None,
        resolution: Optional[int] = None,
    ):
        per_image = masks if isinstance(masks, list) else [masks]
        if any(isinstance(m, str) and m != "attention" for m in per_image):
            raise TrainError(f"masks must be a list of masks, 'attention' or None, got {masks!r}")
        config.check()
        check_superclass(adapter, config.superclass)
        if config.method == "perfusion" and config.token.lower() == config.superclass.lower():
            raise TrainError("the concept word must differ from the superclass word (Infusion uses the class word)")
        self.adapter, self.cov, self.cfg = adapter, covariance, config
        self.work_dir, self.concept_path = Path(work_dir), Path(concept_path)
        images = list(images)
        self.captions = captions or [""] * len(images)
        lacking = captions_without_the_word(config.templates, self.captions)
        if lacking:
            raise TrainError(
                f"image {lacking[0] + 1}'s caption {self.captions[lacking[0]]!r} has no [name], and a template "
                "without [name] takes the word from the caption: write [name] into every caption, or use templates "
                "with [name]"
            )
        self.sizes = [(int(im.shape[-1]), int(im.shape[-2])) for im in images]  # (width, height) px per image
        self.resolution = resolution or round(max(w * h for w, h in self.sizes) ** 0.5)
        self.buckets = list(by_size(images).values())
        self.bucket_of = {i: members for members in self.buckets for i in members}
        self.word = config.token if config.method == "perfusion" else config.superclass
        self.latents, self.masks = self._cache(images, masks)
        self.checkpoint_path = self.work_dir / f"{config.name}.resume.safetensors"
        self.loss_path = self.work_dir / f"{config.name}.loss.csv"

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def _cache(self, images: list[torch.Tensor], masks) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, computed once: latents [F, C, h, w] of it (and its mirror when flipping, F = 2) and loss
        weights [F, h, w] on its latent grid."""
        variants = [images, [im.flip(-1) for im in images]] if self.cfg.flip else [images]
        latents = [torch.stack(z) for z in zip(*(encode_by_size(self.adapter, v) for v in variants))]
        masks = masks if isinstance(masks, list) else [masks] * len(images)
        masks = fill_attention_masks(self.adapter, [z[0] for z in latents], masks, self.cfg.superclass, self.cfg.seed)
        grids = []
        for z, m in zip(latents, masks):
            grid = soft_mask(m.cpu(), tuple(z.shape[-2:])) if m is not None else torch.ones(z.shape[-2:])
            grids.append(torch.stack([grid, grid.flip(-1)])[: z.shape[0]].to(z.device))
        return latents, grids

    def _prompts(self, gen: torch.Generator, idx: list[int], flips: list[int], word: str) -> list[str]:
        out = []
        for i, flipped in zip(idx, flips):
            t = self.cfg.templates[int(torch.randint(len(self.cfg.templates), (1,), generator=gen))]
            caption = mirror_caption(self.captions[i]) if flipped else self.captions[i]
            out.append(fill_template(t, word, caption))
        return out

    def _micro_batch(self, step: int, k: int, word: Optional[str] = None):
        """(x0, mask, prompts, t, noise, size) for micro-batch k of optimiser step `step`, drawn reproducibly;
        prompts are written with `word` (default: the concept's word); size: the images' (width, height) px."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 1_009 + k)
        n = len(self.latents)
        idx = torch.randint(n, (self.cfg.batch_size,), generator=gen).tolist()
        # one size per batch: the first draw picks the bucket, the others are spread over its members
        members = self.bucket_of[idx[0]]
        idx = [idx[0]] + [members[i * len(members) // n] for i in idx[1:]]
        flip = torch.randint(self.latents[0].shape[0], (self.cfg.batch_size,), generator=gen).tolist()
        x0 = torch.stack([self.latents[i][f] for f, i in zip(flip, idx)])
        mask = torch.stack([self.masks[i][f] for f, i in zip(flip, idx)])
        prompts = self._prompts(gen, idx, flip, word or self.word)
        t = torch.randint(self.adapter.alphas_cumprod.shape[0], (self.cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return x0, mask, prompts, t.to(x0.device), noise.to(x0.device), self.sizes[idx[0]]

    # -- state ----------------------------------------------------------------------------
    def _init_state(self) -> TrainState:
        """Embedding, i_super, i*, and value targets. i_super (the locked key's input, and i*'s start) is the
        superclass word's encoding averaged over every template with every image's caption: one micro-batch
        (one prompt at batch size 1) would lock the keys to one template's wording."""
        cfg, ad = self.cfg, self.adapter
        prompts = sorted({fill_template(t, cfg.superclass, c) for t in cfg.templates for c in self.captions})
        with torch.no_grad():
            means = []  # (prompts in the chunk, their mean superclass encoding)
            for start in range(0, len(prompts), 64):
                chunk = prompts[start : start + 64]
                context, rows = ad.encode(chunk, {cfg.superclass: None})
                means.append((len(chunk), _mean_rows(context, rows[cfg.superclass]).double()))
            i_super = (sum(n * m for n, m in means) / len(prompts)).float()
        hooks = attach(ad.diffusion_model, context_dim=ad.context_dim)
        hooks.clear()  # the base model's W_V, whatever the host had switched on
        with torch.no_grad():
            values, keys = {}, {}
            for name, attn in hooks.layers.items():
                start = attn.to_v(i_super[None].to(context.dtype)).float()[0]
                values[name] = torch.zeros_like(start) if cfg.method == "infusion" else start
                if cfg.keys == "trained":
                    keys[name] = attn.to_k(i_super[None].to(context.dtype)).float()[0]
        embedding = (
            ad.word_embedding(cfg.superclass)
            if cfg.method == "perfusion"
            else {k: v[:0] for k, v in ad.word_embedding(cfg.superclass).items()}
        )
        return TrainState(0, i_super, i_super.clone(), values, keys, {k: v.float() for k, v in embedding.items()})

    def _concept(self, state: TrainState, i_star: torch.Tensor, step: int) -> Concept:
        a, energy = concept_gate(self.cov, i_star.detach().float())
        cfg = self.cfg
        return Concept(
            token=self.word,
            superclass=cfg.superclass,
            embedding=state.embedding,
            i_star=i_star,
            a=a,
            energy=energy,
            i_super=state.i_super,
            values=state.values,
            method=cfg.method,
            arch=getattr(self.adapter, "arch", "other"),
            base_model_hash=getattr(self.adapter, "model_hash", ""),
            keys=state.keys,
            covariance_hash=self.cov.hash,
            clip_skip=cfg.clip_skip,
            train_beta=cfg.train_beta,
            train_tau=cfg.train_tau,
            lock=cfg.lock,
            beta=cfg.beta,
            tau=cfg.tau,
            steps=step,
            name=cfg.name,
            shared_metadata=self._summary(step),
        )

    def _summary(self, step: int) -> dict[str, str]:
        """The run in the keys LoRA managers and model sites read (modelspec, kohya's ss_*)."""
        cfg, arch = self.cfg, getattr(self.adapter, "arch", "other")
        tags: dict[str, int] = {}
        for caption in self.captions:
            for tag in (t.strip() for t in caption.split(",")):
                if tag:
                    tags[tag] = tags.get(tag, 0) + 1
        sizes = [self.sizes[members[0]] for members in self.buckets]
        buckets = {
            str(k): {"resolution": list(s), "count": len(m)} for k, (s, m) in enumerate(zip(sizes, self.buckets))
        }
        return {
            "modelspec.resolution": f"{self.resolution}x{self.resolution}",
            "ss_enable_bucket": str(len(self.buckets) > 1),
            "ss_bucket_info": json.dumps({"buckets": buckets}),
            "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(arch, arch),
            "ss_sd_model_hash": str(getattr(self.adapter, "model_hash", "")),
            "ss_resolution": f"({self.resolution}, {self.resolution})",
            "ss_steps": str(step),
            "ss_max_train_steps": str(cfg.steps),
            "ss_num_train_images": str(len(self.captions)),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum),
            "ss_learning_rate": repr(cfg.lr_values),
            "ss_text_encoder_lr": repr(cfg.lr_embedding),
            "ss_seed": str(cfg.seed),
            "ss_tag_frequency": json.dumps({cfg.name: tags}),
            "ss_training_comment": (
                f"{cfg.method} concept '{cfg.token}' (superclass '{cfg.superclass}'), keys {cfg.keys}, "
                f"trained at gate beta {cfg.train_beta:g} tau {cfg.train_tau:g}"
            ),
        }

    def _optimizer(self, state: TrainState) -> torch.optim.Optimizer:
        targets = list(state.values.values()) + list(state.keys.values())
        groups = [{"params": targets, "lr": self.cfg.lr_values, "name": "values"}]
        if self.cfg.method == "perfusion":
            groups.append({"params": list(state.embedding.values()), "lr": self.cfg.lr_embedding, "name": "embedding"})
        return torch.optim.AdamW(groups, weight_decay=0.0)

    def _lr_scale(self, step: int) -> float:
        """The learning rates' factor at optimiser step `step` (0-based): linear warm-up, then the schedule
        from 1 towards 0 (cosine or linear; 0 would be the step after the last), or 1 (constant)."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        done = min(1.0, (step - cfg.warmup_steps) / span)  # 0 at the first step after warm-up, < 1 at the last
        return 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, state: TrainState, opt: torch.optim.Optimizer) -> Path:
        tensors = state.tensors()
        names = {id(p): name for name, p in state.params().items()}
        for p, s in opt.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"adam.{key}.{names[id(p)]}"] = s[key].detach().cpu().contiguous()
            tensors[f"adam.step.{names[id(p)]}"] = torch.as_tensor(s["step"], dtype=torch.float64).reshape(1).cpu()
        meta = {"perfusion_checkpoint": "1", "step": str(state.step), "config": json.dumps(asdict(self.cfg))}
        return atomic_write(self.checkpoint_path, save_bytes(tensors, metadata=meta))

    def _resume(self) -> tuple[TrainState, dict]:
        """(state, optimizer tensors) from the checkpoint; refuses one made with another config."""
        try:
            with safe_open(str(self.checkpoint_path), "pt") as f:
                meta = f.metadata() or {}
            saved = json.loads(meta["config"])
            tensors = load_file(str(self.checkpoint_path))
        except Exception as e:
            raise TrainError(f"{self.checkpoint_path}: unreadable checkpoint ({e}); delete it to start over") from None
        ours = asdict(self.cfg)
        changed = [k for k in TrainConfig.fixed_on_resume() if json.dumps(saved.get(k)) != json.dumps(ours[k])]
        if changed:
            raise TrainError(
                f"{self.checkpoint_path}: made with different {', '.join(changed)}; "
                "start a new run under another name or delete the checkpoint"
            )
        dev = self.adapter.device
        state = TrainState.from_tensors(tensors, int(meta["step"]), dev)
        return state, {k: v.to(dev) for k, v in tensors.items() if k.startswith("adam.")}

    @staticmethod
    def _load_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], saved: dict[str, torch.Tensor]) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                if f"adam.exp_avg.{name}" in saved:
                    opt.state[p] = {
                        "step": torch.tensor(float(saved[f"adam.step.{name}"][0])),
                        "exp_avg": saved[f"adam.exp_avg.{name}"].clone(),
                        "exp_avg_sq": saved[f"adam.exp_avg_sq.{name}"].clone(),
                    }

    # -- the loop -------------------------------------------------------------------------
    def run(
        self,
        resume: bool = False,
        progress: Optional[Callable[[Progress], None]] = None,
        should_stop: Callable[[], bool] = lambda: False,
        preview: Optional[Callable[[Concept, int], None]] = None,
    ) -> TrainResult:
        """Train to `steps` (from the checkpoint if `resume`), saving atomically; returns the final concept."""
        cfg, ad = self.cfg, self.adapter
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if resume and not self.checkpoint_path.exists():
            raise TrainError(f"nothing to resume: {self.checkpoint_path} does not exist")
        state, saved_opt = self._resume() if resume else (self._init_state(), {})
        state.trainable()
        opt = self._optimizer(state)
        self._load_optimizer(opt, {id(p): n for n, p in state.params().items()}, saved_opt)
        losses = _read_losses(self.loss_path, state.step) if resume else []
        hooks = attach(ad.diffusion_model, context_dim=ad.context_dim)
        scaler = loss_scaler(ad.diffusion_model)
        clock = _Clock(state.step, losses[-1] if losses else None)
        interrupted = False
        try:
            if preview and cfg.preview_every and state.step == 0:  # the starting point, to compare with
                self._preview(state, hooks, preview)
            with checkpointed_blocks(ad.diffusion_model) if cfg.gradient_checkpointing else nullcontext():
                while state.step < cfg.steps:
                    loss = self._step(state, opt, hooks, scaler, should_stop)
                    if loss is None:  # interrupted mid-step: state is the last whole step, as the checkpoint
                        interrupted = True
                        break
                    losses.append(loss)
                    self._after_step(state, opt, hooks, loss, clock, progress, preview)
            if preview and cfg.preview_every and not interrupted and state.step % cfg.preview_every:
                self._preview(state, hooks, preview)  # the end, when it was not a preview step
        finally:
            hooks.clear()
        self.save_checkpoint(state, opt)
        concept = self._concept(state, state.i_star.detach(), state.step)
        return TrainResult(concept, save_concept(concept, self.concept_path), state.step, interrupted, losses)

    def _step(self, state: TrainState, opt, hooks, scaler, should_stop: Callable[[], bool]) -> Optional[float]:
        """One optimiser step over grad_accum micro-batches; its loss, or None (nothing applied) if stopped."""
        cfg = self.cfg
        for group in opt.param_groups:
            group["lr"] = (cfg.lr_values if group["name"] == "values" else cfg.lr_embedding) * self._lr_scale(
                state.step
            )
        total, i_star_before = 0.0, state.i_star
        for k in range(cfg.grad_accum):
            if should_stop():
                state.i_star = i_star_before
                opt.zero_grad(set_to_none=True)
                return None
            total += self._micro_step(state, hooks, scaler, state.step, k) / cfg.grad_accum
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        return total

    def _after_step(self, state: TrainState, opt, hooks, loss: float, clock: _Clock, progress, preview) -> None:
        """Log the loss, report progress, save a snapshot and show a preview when they are due."""
        cfg, step = self.cfg, state.step
        smoothed = clock.smooth(loss)
        self._append_loss(step, loss, smoothed)
        if progress:
            rate, scale = clock.rate(step), self._lr_scale(step - 1)
            a, _ = concept_gate(self.cov, state.i_star.detach().float())
            progress(
                Progress(
                    step,
                    cfg.steps,
                    loss,
                    smoothed,
                    (cfg.steps - step) / max(rate, 1e-9),
                    rate,
                    cfg.lr_values * scale,
                    cfg.lr_embedding * scale,
                    float(a @ state.i_super.float()),
                )
            )
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            self.save_checkpoint(state, opt)
            save_concept(self._concept(state, state.i_star, step), self.work_dir / f"{cfg.name}-{step:05d}.safetensors")
        if preview and cfg.preview_every and step % cfg.preview_every == 0:
            self._preview(state, hooks, preview)

    def _preview(self, state: TrainState, hooks, preview: Callable[[Concept, int], object]) -> None:
        with torch.no_grad():
            concept = self._concept(state, state.i_star, state.step)
            hooks.activate([Activation(concept, self.cfg.beta, self.cfg.tau)])
            preview(concept, state.step)

    def _confined(self, context: torch.Tensor, rows: list[list[int]], prompts: list[str], size) -> torch.Tensor:
        with torch.no_grad():
            twin, _ = self.adapter.encode(
                prompts, {self.word: self.adapter.word_embedding(self.cfg.superclass)}, size=size
            )
        return confined_context(context, twin, {self.word: rows})

    def _micro_step(self, state: TrainState, hooks, scaler: torch.amp.GradScaler, step: int, k: int) -> float:
        cfg, ad = self.cfg, self.adapter
        x0, mask, prompts, t, noise, size = self._micro_batch(step, k)
        embedding = state.embedding if cfg.method == "perfusion" else None
        context, rows = ad.encode(prompts, {self.word: embedding}, size=size)
        if not torch.isfinite(context).all():  # before the gate is computed from it (and from C)
            raise NonFiniteError(
                f"step {step + 1}: the text encoder's output for {prompts} holds NaN or Inf; "
                "stopped before applying the step",
                "text encoder",
            )
        rows = rows[self.word]
        if cfg.confine:
            context = self._confined(context, rows, prompts, size)
        i_star = state.i_star
        if cfg.method == "perfusion" and cfg.ema is not None:
            m = _mean_rows(context, rows).float()
            i_star = cfg.ema * i_star + (1 - cfg.ema) * m.detach()
            state.i_star = i_star
            if cfg.i_star_gradient == "straight_through":  # value of the EMA, gradient of the fresh encoding
                i_star = i_star + (1 - cfg.ema) * (m - m.detach())
        concept = self._concept(state, i_star, step)
        hooks.activate(
            [Activation(concept, cfg.train_beta, cfg.train_tau, lock=cfg.lock, ungated=not cfg.gated)]
            if cfg.edit
            else []
        )
        x_t = q_sample(x0, t, noise, ad.alphas_cumprod)
        pred = ad.apply_model(x_t.to(context.dtype), t, context).float()
        target = training_target(x0, t, noise, ad.alphas_cumprod, ad.prediction)
        per_pixel = (pred - target).square().mean(1)  # [B, h, w]
        loss = (per_pixel * mask).mean()
        value = float(loss.detach())  # one sync for the loss: its value is logged anyway
        if not math.isfinite(value):
            raise NonFiniteError(
                f"step {step + 1}: the loss is {value} (NaN or Inf in the U-Net's prediction); "
                "stopped before applying the step",
                "loss",
            )
        scaler.scale(loss / cfg.grad_accum).backward()
        return value

    def _append_loss(self, step: int, loss: float, smoothed: float) -> None:
        new = not self.loss_path.exists()
        with open(self.loss_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "loss", "smoothed_loss", "time"])
            w.writerow([step, repr(loss), repr(smoothed), time.strftime("%Y-%m-%dT%H:%M:%S")])


def confined_context(context: torch.Tensor, twin: torch.Tensor, rows: dict[str, list[list[int]]]) -> torch.Tensor:
    """`twin` [B, N, d] (the prompts with each concept word as its superclass) with the concept words' own rows
    taken from `context` [B, N, d]; rows: {word: per prompt, its rows}."""
    keep = torch.zeros(context.shape[:2], dtype=torch.bool, device=context.device)
    for per_prompt in rows.values():
        for b, r in enumerate(per_prompt):
            keep[b, r] = True
    return torch.where(keep[..., None], context, twin.to(context.dtype))


def _mean_rows(context: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """Mean of context[b, r] over every listed row of every prompt: [d]."""
    picked = [context[b, r] for b, rs in enumerate(rows) for r in rs]
    if not picked:
        raise TrainError("the concept word was not found in the training prompts (check the templates)")
    return torch.stack(picked).mean(0)


def _read_losses(path: Path, upto: int) -> list[float]:
    """Losses of steps 1..upto from the CSV, dropping rows past the checkpoint (rewritten atomically)."""
    if not path.exists():
        return []
    rows = [r for r in csv.reader(io.StringIO(path.read_text())) if r and r[0].isdigit() and int(r[0]) <= upto]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss", "smoothed_loss", "time"])
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode())
    return [float(r[1]) for r in rows]
