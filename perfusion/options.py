"""Every choice an option offers and every default, in one place: engine, trainer, tags, settings and tab
import them from here."""

from __future__ import annotations

from typing import Literal, Optional, get_args

Method = Literal["perfusion", "infusion"]  # key-locked rank-1 edit with a learned word; Infusion's value residual
Arch = Literal["sd1", "sd2", "sdxl", "other"]
# Key-locking at inference (PERFUSION.md): local gates the key edit like the value edit; global feeds the
# superclass-substituted prompt to every key; hard is local with the key edit ungated (x W i_super in place
# of x W i*, ROME's closed form): the concept's key direction is the superclass's whatever its gate,
# which keeps a concept that comes second in a prompt from drawing attention to itself.
Lock = Literal["local", "global", "hard"]
# How a concept's key is locked while it trains (stored in the file; an inference lock of None follows it):
# local, the paper's gated key edit; hard, the key row held at W_K i_super, so the values carry the identity.
TrainLock = Literal["local", "hard"]
# What a user picks (sliders, tags, settings, X/Y/Z, ComfyUI): auto applies each concept with its training lock.
LockChoice = Literal["auto", "local", "global", "hard"]
Projection = Literal["approximate", "exact"]  # how several concepts share one edit
# How a prompt with several concepts is drawn: regional, each concept from its own clause inside its own region
# (the place its clause names, or where the base model's attention puts its superclass word; RegionSource below;
# perfusion.regional, measured best in docs/world.md); together, the paper's: every concept edits the one prompt,
# their edits combined per Projection.
Composition = Literal["regional", "together"]
# How regional composition hands a concept its region: prediction, a U-Net pass per concept from its own prompt
# (seeing the other concepts' regions as background), the predictions blended with the masks; attention, one U-Net
# pass in which every cross-attention's output is blended, the concept's own prompt's output inside its region (the
# image keeps one layout; cheaper, one pass); auto, attention where the regions come from the places the prompt
# names, prediction where from the model's attention. Prediction is the default: on the mini world's pairs both
# objects keep their look 0.52 of the time against 0.21 by attention (docs/world.md, ninth session).
RegionBlend = Literal["auto", "prediction", "attention"]
# Where regional composition's regions come from: places, the place each concept's clause names ("at the left",
# "in the top right corner") when every concept's clause names another one, else the base model's attention on
# the superclass words; attention, always that attention.
RegionSource = Literal["places", "attention"]
MaskSource = Literal["auto", "alpha", "files", "none"]  # where a training image's object mask comes from
Keys = Literal["locked", "trained"]  # trained: the ablation without key-locking
IStarGradient = Literal["detach", "straight_through"]  # how the EMA of i* meets the gradient
LrSchedule = Literal["constant", "cosine", "linear"]  # after the warm-up: kept, cosine or linear decay to 0
# buckets: each photo keeps its aspect ratio in the nearest of a set of sizes of about resolution^2 pixels;
# square: centre-cropped to resolution x resolution
Aspect = Literal["buckets", "square"]

METHODS: tuple[str, ...] = get_args(Method)
ARCHS: tuple[str, ...] = get_args(Arch)
LOCKS: tuple[str, ...] = get_args(Lock)
TRAIN_LOCKS: tuple[str, ...] = get_args(TrainLock)
LOCK_CHOICES: tuple[str, ...] = get_args(LockChoice)
PROJECTIONS: tuple[str, ...] = get_args(Projection)
COMPOSITIONS: tuple[str, ...] = get_args(Composition)
REGION_BLENDS: tuple[str, ...] = get_args(RegionBlend)
REGION_SOURCES: tuple[str, ...] = get_args(RegionSource)
MASK_SOURCES: tuple[str, ...] = get_args(MaskSource)
KEYS: tuple[str, ...] = get_args(Keys)
I_STAR_GRADIENTS: tuple[str, ...] = get_args(IStarGradient)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
ASPECTS: tuple[str, ...] = get_args(Aspect)
# Bucket sides are multiples of this (px): SD's VAE divides by 8 and its U-Net halves the latent 3 times.
BUCKET_MULTIPLE = 64
COMPOSITION: Composition = "regional"
# Regional composition's mask from the base pass's attention on a superclass word (min-max per image): 0 up to
# the first value, all the concept's pass from the second, linear between (measured in docs/world.md: handing
# the region wholly to the concept beats the soft map, 0.45 against 0.31 of objects with their look).
REGION_RAMP = (0.25, 0.45)
REGION_BLEND: RegionBlend = "prediction"
REGION_SOURCE: RegionSource = "places"
# A named place's region: an ellipse centred in that part of the image (a quarter of the way in from its sides),
# radii this fraction of the image's width and height, the edge soft over +- PLACE_EDGE of a radius.
PLACE_RADIUS, PLACE_EDGE = 0.25, 0.15

# The gate sigmoid((s - beta) / tau): the paper's inference default, and the one training runs at.
BETA, TAU = 0.7, 0.15
TRAIN_BETA, TRAIN_TAU = 0.75, 0.10
# What tags, sliders, settings and the API accept (higher beta: weaker concept, closer to the prompt).
BETA_RANGE = (-1.0, 2.0)
TAU_RANGE = (0.01, 2.0)


def activation_lock(choice: str) -> Optional[Lock]:
    """The Activation lock for a user's choice: None (the concept's own) for auto."""
    return None if choice == "auto" else choice  # type: ignore[return-value]
