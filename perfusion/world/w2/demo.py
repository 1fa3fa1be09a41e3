"""The main job on world 2: learn two instances (looks no caption can ask for) with Perfusion on the embedded
mini model, then render a labelled contact sheet: the instances in new places, sizes and backgrounds, a beta
sweep, and both in one prompt in every order and layout, applied together and composed region by region. Each image is labelled with what the identity reader
(w2/analyze.py) sees: a check mark where the object is its instance.

    ./dev.sh demo [--steps N] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...concept import Concept
from ...generate import generate
from ...hooks import Activation
from ...train import Progress
from .. import model as mini
from ..demo import contact_sheet, world_covariance
from ..scenes import from_tensor
from .accuracy import LATENT_SHAPE, WEIGHTS
from .analyze import is_instance, read, read_places
from .examples import EXAMPLES, write_folder
from .quality import Instance, group_prompts, render_regional, train_concept
from .scenes import Thing, scenes_and_captions

DEMO = ("boxy", "duo")  # a blue box with a cyan lower half, a red ball with a yellow lower half
BETA, TAU = 0.6, 0.15
PLACES = (
    "a [0] at the left on a white background",
    "a small [0] at the top on a black background",
    "a big [0] in the centre on a brown background",
    "a [0] at the right on a gray background",
    "a small [0] at the bottom on a white background",
)


def train_instance(adapter, cov, token: str, folder: Path, steps: int, out: Path) -> Concept:
    """The benchmark's training of one bundled look, with a progress line (concept in OUT/concepts)."""
    look = EXAMPLES[token]
    started = time.monotonic()

    def show(p: Progress):
        print(f"\r  {token}: step {p.step}/{p.total}  loss {p.smoothed:.4f}  eta {p.eta_s:4.0f}s", end="", flush=True)

    inst = Instance(token, look.shape, folder, look)
    concept = train_concept(adapter, cov, inst, steps, out, progress=show, beta=BETA, tau=TAU)
    print(f"\r  {token}: {concept.steps} steps in {time.monotonic() - started:.0f}s" + " " * 20)
    return concept


def _mark(look: Thing, reading) -> str:
    return "ok" if is_instance(reading, look) else "not it"


def render_rows(adapter, concepts: dict[str, Concept], folders: dict[str, Path], steps: int, seed: int = 1) -> list:
    """The sheet's rows: (title, [(image uint8 [48, 48, 3], label), ...]) for two concepts and their folders."""
    (a, ca), (b, cb) = concepts.items()
    kw = dict(latent_shape=LATENT_SHAPE, steps=steps, guidance=2.0, seed=seed)

    def images(prompts: list[str], items) -> list[np.ndarray]:
        return list(from_tensor(generate(adapter, prompts, items, **kw)))

    def alone(token: str, concept: Concept, items) -> list[tuple[np.ndarray, str]]:
        prompts = [p.replace("[0]", token) for p in PLACES]
        return [(img, _mark(EXAMPLES[concept.token], read(img))) for img in images(prompts, items)]

    rows = []
    for token in (a, b):
        look = EXAMPLES[token]
        rows.append(
            (
                f"Training images: {token}, a {look.colour} {look.shape} with a {look.accent} {look.pattern} accent "
                "(no caption can ask for it)",
                [(np.asarray(Image.open(p).convert("RGB")), p.stem) for p in sorted(folders[token].glob("*-?.png"))],
            )
        )
    rows.append((f"Base model, the superclass word ({ca.superclass})", alone(ca.superclass, ca, [])))
    for token, concept in ((a, ca), (b, cb)):
        rows.append(
            (
                f"Perfusion: {token} in new places (lock {concept.lock}, beta {BETA}, tau {TAU}); label: the reader's verdict",
                alone(token, concept, [Activation(concept, BETA, TAU)]),
            )
        )
    sweep = PLACES[0].replace("[0]", a)
    betas = (0.3, 0.45, 0.6, 0.75, 0.9)
    rows.append(
        (
            f"Beta sweep: '{sweep}' (low beta = stronger concept)",
            [(images([sweep], [Activation(ca, beta, TAU)])[0], f"beta {beta}") for beta in betas],
        )
    )
    prompts = group_prompts(2)

    def marked(pictures) -> list[tuple[np.ndarray, str]]:
        """Each group prompt's picture, labelled with the reader's verdict on each object at its place."""
        cells = []
        for prompt, img in zip(prompts, pictures):
            looks = [EXAMPLES[(a, b)[k]] for k in prompt.objects]
            marks = " ".join(_mark(look, r) for look, r in zip(looks, read_places(img, prompt.places)))
            cells.append((img, f"{' + '.join((a, b)[k] for k in prompt.objects)}: {marks}"))
        return cells

    both = [Activation(ca, BETA, TAU), Activation(cb, BETA, TAU)]
    together = images([p.text.replace("[0]", a).replace("[1]", b) for p in prompts], both)
    rows.append((f"Two concepts applied together in one prompt ({a} + {b}), every order and layout", marked(together)))
    titles = {
        "prediction": "The same prompts composed region by region (the default: a pass per concept, from its clause)",
        "attention": "Composed region by region with the attention blend (one U-Net pass)",
    }
    for blend, title in titles.items():
        composed = render_regional(adapter, prompts, [ca, cb], BETA, 1, steps, seed=seed, blend=blend)
        rows.append((title, marked(composed)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Perfusion on the embedded world-2 mini model: a contact sheet.")
    p.add_argument("--steps", type=int, default=150, help="training steps per concept")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per image")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--quick", action="store_true", help="smoke run: 3 training steps, 3 sampling steps")
    a = p.parse_args(argv)
    steps, sample_steps = (3, 3) if a.quick else (a.steps, a.sample_steps)
    torch.manual_seed(0)
    print(f"loading the mini model ({WEIGHTS})")
    try:
        adapter = mini.load(WEIGHTS)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    print("covariance of the mini text encoder (cached after the first run)")
    cov = world_covariance(adapter, a.out / "cache", captions=scenes_and_captions)
    concepts, folders = {}, {}
    for k, token in enumerate(DEMO):  # the instances' photos, as a user's folders would hold them
        folders[token] = a.out / "instances" / token
        write_folder(folders[token], EXAMPLES[token], seed=k)
        print(f"training '{token}' (superclass '{EXAMPLES[token].shape}') from {folders[token]}")
        concepts[token] = train_instance(adapter, cov, token, folders[token], steps, a.out)
    print("rendering the contact sheet")
    path = contact_sheet(render_rows(adapter, concepts, folders, sample_steps), a.out / "contact-sheet.png")
    print(f"contact sheet: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
