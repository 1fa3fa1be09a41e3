"""Identity against alignment on world 2, for instances from any folders, alone and in pairs and triples.

    ./dev.sh python -m perfusion.world.w2.quality [--instance DIR[:TOKEN[:SUPERCLASS]] ...] [--quick]
        [--only groups|pairs] [--train-seed N]

Each concept trains by the world's `RECIPE` (training seed N, 0 by default: one training is a draw). Each
instance's look (shape, body colour, pattern, accent) is read off its own images by the identity reader
(w2/analyze.py); its token defaults to the folder's name and its superclass to the shape read.
Without --instance the bundled looks (w2/examples.py) are written to OUT/instances and used. --train-lock hard
trains every concept with the key held at its superclass's (options.TrainLock); inference modes name their lock.

- single: 5 prompts that place the concept alone and 2 with a second object whose colours and shape differ
  from the instance's (concept first, concept second); fidelity = the object is the instance, alignment =
  the asked position, size and background, and the second object's shape, colour and pattern.
- pairs and triples: every pair (and the first triples) of instances in one prompt, both orders and layouts;
  the pair score is the fraction of images in which every object is its own instance. Its reference is
  the base model given each instance's words ("a small red checkered ball"): the fraction in which every
  object shows what its words ask. (Words cannot ask for an accent colour, so their identity score is
  chance; it is reported too.)
- --only pairs: the firmer pair measurement: every pair, its 4 prompts on each of the 4 backgrounds (16), with
  the regional modes and each concept alone only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from ...concept import Concept
from ...dataset import load_dataset
from ...generate import generate
from ...hooks import Activation
from ...options import REGION_BLEND, TRAIN_LOCKS, RegionBlend
from ...regional import Region, generate_regional
from ...train import TrainConfig
from .. import model as mini
from ..demo import TEMPLATES, train_folder, world_covariance
from ..quality import pareto_plot, sample_grid
from ..scenes import from_tensor
from .accuracy import LATENT_SHAPE, WEIGHTS, asked
from .analyze import Reading, is_instance, read, read_places
from .examples import TEMPLATES as CAPTION_TEMPLATES
from .examples import write_examples
from .scenes import BACKGROUNDS, COLOURS, SHAPES, SIZE, Thing, article, scenes_and_captions

Part = Literal["all", "groups", "pairs"]  # what a run measures (see the module's docstring)


@dataclass(frozen=True)
class Instance:
    token: str
    superclass: str
    folder: Path
    look: Thing  # as read off its images (position and size are the placeholders' defaults)


def instance_of(spec: str) -> Instance:
    """'DIR[:TOKEN[:SUPERCLASS]]' -> the instance, its look read off its images (the commonest reading)."""
    folder, *rest = spec.split(":")
    samples = load_dataset(folder, resolution=SIZE, min_size=16, mask_source="none").samples
    readings = [read(from_tensor(s.image[None])[0]) for s in samples]
    (shape, colour, pattern, accent), _ = Counter(
        (r.shape, r.colour, r.pattern, r.accent) for r in readings
    ).most_common(1)[0]
    if shape is None or pattern is None:
        raise SystemExit(f"{folder}: its images do not read as one world-2 object (got {readings[0]})")
    token = rest[0] if rest else Path(folder).name
    return Instance(
        token, rest[1] if len(rest) > 1 else shape, Path(folder), Thing(shape, colour, pattern, accent=accent)
    )


def other_object(looks: list[Thing], rng: random.Random) -> Thing:
    """A second object that shares neither shape nor any colour with the instances (so spill shows)."""
    used = {c for t in looks for c in (t.colour, t.accent) if c}
    colours = [c for c in COLOURS if c not in used] or list(COLOURS)
    shapes = [s for s in SHAPES if s not in {t.shape for t in looks}] or list(SHAPES)
    return Thing(rng.choice(shapes), rng.choice(colours), "plain", "small")


@dataclass(frozen=True)
class Prompt:
    """Text with [0], [1], ... for concept words; places of its objects; what each object must be."""

    text: str
    places: tuple[str, ...]
    objects: tuple  # per place: an int (that concept) or a Thing (asked by words)
    asked: dict  # asked of the single concept's object: size / position / background


def look_words(look: Thing, size: str = "") -> str:
    """The words that come closest to an instance: '[size ]red checkered ball' (no word names the accent)."""
    return " ".join(w for w in (size, look.colour, "" if look.pattern == "plain" else look.pattern, look.shape) if w)


def single_prompts(other: Thing) -> list[Prompt]:
    words = look_words(other, "small")
    one = lambda text, **asked: Prompt(text, ("any",), (0,), asked)  # noqa: E731
    return [
        one("a [0] at the left on a white background", position="left", background="white"),
        one("a small [0] at the top on a black background", size="small", position="top", background="black"),
        one("a big [0] in the centre on a brown background", size="big", position="centre", background="brown"),
        one("a [0] at the right on a gray background", position="right", background="gray"),
        one("a small [0] at the bottom on a white background", size="small", position="bottom", background="white"),
        Prompt(
            f"a small [0] at the left and {article(words)} at the right on a black background",
            ("left", "right"),
            (0, replace(other, position="right")),
            dict(background="black"),
        ),
        Prompt(
            f"{article(words)} at the top and a small [0] at the bottom on a gray background",
            ("top", "bottom"),
            (replace(other, position="top"), 0),
            dict(background="gray"),
        ),
    ]


def group_prompts(n: int, every_background: bool = False) -> list[Prompt]:
    """Prompts with concepts [0]..[n-1] (n = 2 or 3), every concept in every place once (a pair's on each
    background with every_background)."""
    if n == 2:
        layouts = [(("left", "right"), "gray"), (("top", "bottom"), "white")]
        if every_background:
            layouts = [(places, b) for places, _ in layouts for b in BACKGROUNDS]
        orders = [(0, 1), (1, 0)]
    else:
        layouts = [
            (("top left", "top right", "bottom left"), "gray"),
            (("top right", "bottom left", "bottom right"), "black"),
        ]
        orders = [(0, 1, 2), (2, 0, 1), (1, 2, 0)]
    out = []
    for (places, background), order in itertools.product(layouts, orders):
        parts = [f"a small [{k}] at the {p}" for k, p in zip(order, places)]  # the world's groups are small
        body = " and ".join(parts) if n == 2 else f"{parts[0]}, {parts[1]} and {parts[2]}"
        out.append(Prompt(f"{body} on a {background} background", places, order, dict(background=background)))
    return out


def _fill(text: str, words: list[str]) -> str:
    for k, w in enumerate(words):
        text = text.replace(f"[{k}]", w)
    return text


def judge(image: np.ndarray, prompt: Prompt, looks: list[Thing]) -> tuple[list[bool], float, list[bool]]:
    """(is each concept object its instance, alignment fraction, does each object show what its words ask)."""
    readings: list[Reading] = [read(image)] if prompt.places == ("any",) else list(read_places(image, prompt.places))
    identity, words_right, hits = [], [], []
    for r, obj in zip(readings, prompt.objects):
        if isinstance(obj, int):
            identity.append(is_instance(r, looks[obj]))
            words_right.append(all(asked(r, looks[obj]).values()))
        else:
            hits += list(asked(r, obj).values())
    for key, value in prompt.asked.items():
        hits.append((readings[0].background if key == "background" else getattr(readings[0], key)) == value)
    return identity, float(np.mean(hits)) if hits else 1.0, words_right


@dataclass(frozen=True)
class Mode:
    """How concepts are applied at inference."""

    name: str
    lock: str = "local"
    projection: str = "approximate"
    betas: tuple = (0.5, 0.6, 0.7, 0.8)
    edit: bool = True
    regional: bool = False  # each concept from its own prompt inside its own region (perfusion.regional)
    blend: RegionBlend = REGION_BLEND  # regional only: how a region is drawn


MODES = (
    Mode("Perfusion local"),
    Mode("Perfusion global", lock="global", betas=(0.3, 0.4, 0.5, 0.6)),
    Mode("textual inversion", betas=(None,), edit=False),
)
GROUP_MODES = (
    Mode("local approximate", betas=(0.7,)),
    Mode("local exact", projection="exact", betas=(0.7,)),
    Mode("global approximate", lock="global", betas=(0.5,)),
    Mode("global exact", lock="global", projection="exact", betas=(0.5,)),
    Mode("local regional", betas=(0.6,), regional=True),  # the default blend: prediction
    Mode("local regional, attention blend", betas=(0.6,), regional=True, blend="attention"),
)


def render(
    adapter,
    texts: list[str],
    concepts: list[Concept],
    mode: Optional[Mode],
    beta,
    seeds: int,
    steps: int,
    seed: int = 7,
) -> np.ndarray:
    """uint8 [len(texts) * seeds, 48, 48, 3]; mode None: the base model."""
    texts = [t for t in texts for _ in range(seeds)]
    kw = dict(latent_shape=LATENT_SHAPE, seed=seed, steps=steps)
    if mode is None:
        return from_tensor(generate(adapter, texts, [], **kw))
    if not mode.edit:
        words = {c.token: c.embedding for c in concepts}
        return from_tensor(generate(adapter, texts, [], words=words, **kw))
    items = [Activation(c, beta, c.tau, lock=mode.lock) for c in concepts]
    return from_tensor(generate(adapter, texts, items, projection=mode.projection, **kw))


def own_clauses(prompts: list[Prompt], tokens: list[str]) -> list[list[str]]:
    """Per concept k, per prompt: its own clause 'a small TOKEN at the PLACE on a BACKGROUND background', its place
    and background the group prompt's."""
    return [
        [f"a small {t} at the {p.places[p.objects.index(k)]} on a {p.asked['background']} background" for p in prompts]
        for k, t in enumerate(tokens)
    ]


def render_regional(
    adapter,
    prompts: list[Prompt],
    concepts: list[Concept],
    beta: float,
    seeds: int,
    steps: int,
    seed: int = 7,
    blend: RegionBlend = REGION_BLEND,
) -> np.ndarray:
    """Group prompts composed region by region, each concept from its own clause (`own_clauses`)."""
    ps = [p for p in prompts for _ in range(seeds)]
    clauses = own_clauses(ps, [c.token for c in concepts])
    regions = [Region(Activation(c, beta, c.tau), clauses[k]) for k, c in enumerate(concepts)]
    texts = [_fill(p.text, [c.token for c in concepts]) for p in ps]
    return from_tensor(
        generate_regional(adapter, texts, regions, latent_shape=LATENT_SHAPE, seed=seed, steps=steps, blend=blend)
    )


def alone_all_identities(
    adapter, prompts: list[Prompt], concepts: list[Concept], looks: list[Thing], beta, seeds: int, steps: int, seed: int
) -> float:
    """How often every concept, generated alone from its own clause with the same noise, is its instance at its
    place: what a composition that lost nothing could reach on these prompts."""
    ps = [p for p in prompts for _ in range(seeds)]
    clauses = own_clauses(prompts, [c.token for c in concepts])
    hits = []
    for k, (concept, look) in enumerate(zip(concepts, looks)):
        images = render(adapter, clauses[k], [concept], MODES[0], beta, seeds, steps, seed=seed)
        readings = [read(img) for img in images]
        places = [p.places[p.objects.index(k)] for p in ps]
        hits.append([is_instance(r, look) and r.position == place for r, place in zip(readings, places)])
    return float(np.mean([all(h) for h in zip(*hits)]))


def scores(images: np.ndarray, prompts: list[Prompt], looks: list[Thing], seeds: int) -> dict:
    judged = [judge(img, p, looks) for img, p in zip(images, [p for p in prompts for _ in range(seeds)])]
    return {
        "fidelity": float(np.mean([x for ident, _, _ in judged for x in ident])),
        "all_identities": float(np.mean([all(ident) for ident, _, _ in judged])),
        "alignment": float(np.mean([a for _, a, _ in judged])),
        "all_words": float(np.mean([all(w) for _, _, w in judged])),
    }


def _captions_place_the_word(folder: Path) -> bool:
    """Whether every caption file of the folder holds [name] (the bundled folders' way), else the captions are
    what follows the word."""
    captions = list(Path(folder).glob("*.txt"))
    return bool(captions) and all("[name]" in c.read_text(encoding="utf-8") for c in captions)


# How the world's concepts train: batches of 8 at twice the trainer's learning rates (the paper's, for Stable
# Diffusion). On the 5.4M-parameter mini model those leave a small instance's look half learnt in 150 steps, and
# more steps lose it instead (docs/world.md, seventh and thirteenth sessions).
RECIPE = dict(batch_size=8, grad_accum=1, lr_values=0.06, lr_embedding=0.012)


def train_concept(adapter, cov, inst: Instance, steps: int, out: Path, progress=None, **overrides) -> Concept:
    """The instance's concept at OUT/concepts/TOKEN.safetensors (`RECIPE`, the world's templates; overrides win)."""
    templates = CAPTION_TEMPLATES if _captions_place_the_word(inst.folder) else TEMPLATES
    settings = dict(steps=steps, templates=templates) | RECIPE | overrides
    cfg = TrainConfig(name=inst.token, token=inst.token, superclass=inst.superclass, **settings)
    path = out / "concepts" / f"{inst.token}.safetensors"
    return train_folder(
        adapter, cov, inst.folder, cfg, path, out / "work" / inst.token, progress=progress, resolution=SIZE
    )


def benchmark(
    adapter,
    instances: list[Instance],
    concepts: list[Concept],
    seeds: int,
    steps: int,
    quick: bool,
    part: Part = "all",
) -> tuple[list[dict], list]:
    rows, grids, rng = [], [], random.Random(0)
    for inst, concept in zip(instances, concepts) if part == "all" else []:
        other = other_object([inst.look], rng)
        prompts = single_prompts(other)
        looks = [inst.look]
        sup = render(adapter, [_fill(p.text, [inst.superclass]) for p in prompts], [], None, None, seeds, steps)
        words = look_words(inst.look)
        said = render(adapter, [_fill(p.text, [words]) for p in prompts], [], None, None, seeds, steps)
        rows.append(
            {
                "instance": inst.token,
                "method": "base (superclass word)",
                "beta": None,
                **scores(sup, prompts, looks, seeds),
            }
        )
        rows.append(
            {
                "instance": inst.token,
                "method": f"base (words: {words})",
                "beta": None,
                **scores(said, prompts, looks, seeds),
            }
        )
        grids.append((f"{inst.token}: base, superclass", sup[::seeds]))
        for mode in MODES:
            for beta in (mode.betas[len(mode.betas) // 2],) if quick else mode.betas:
                images = render(
                    adapter, [_fill(p.text, [inst.token]) for p in prompts], [concept], mode, beta, seeds, steps
                )
                rows.append(
                    {"instance": inst.token, "method": mode.name, "beta": beta, **scores(images, prompts, looks, seeds)}
                )
                print(
                    f"  {inst.token:8s} {mode.name:18s} beta {beta}: fidelity {rows[-1]['fidelity']:.2f} "
                    f"alignment {rows[-1]['alignment']:.2f}",
                    flush=True,
                )
                if beta == mode.betas[len(mode.betas) // 2]:
                    grids.append((f"{inst.token}: {mode.name} b={beta}", images[::seeds]))

    def shown(mode) -> bool:
        """In the quick run and the grids: the first mode and the regional ones."""
        return mode is GROUP_MODES[0] or mode.regional

    groups = list(itertools.combinations(range(len(instances)), 2))
    if part != "pairs":
        groups += list(itertools.combinations(range(len(instances)), 3))[: 1 if quick else 4]
    for group in groups:
        chosen = [instances[k] for k in group]
        prompts = group_prompts(len(group), every_background=part == "pairs")
        looks = [i.look for i in chosen]
        words = [look_words(i.look) for i in chosen]
        said = render(adapter, [_fill(p.text, words) for p in prompts], [], None, None, seeds, steps, seed=11)
        base = scores(said, prompts, looks, seeds)
        name = " + ".join(i.token for i in chosen)
        rows.append({"group": name, "method": "base (words)", **base})
        members, alone = [concepts[k] for k in group], None
        for mode in [m for m in GROUP_MODES if (m.regional if part == "pairs" else shown(m) or not quick)]:
            if mode.regional:
                images = render_regional(
                    adapter, prompts, members, mode.betas[0], seeds, steps, seed=11, blend=mode.blend
                )
            else:
                texts = [_fill(p.text, [i.token for i in chosen]) for p in prompts]
                images = render(adapter, texts, members, mode, mode.betas[0], seeds, steps, seed=11)
            r = scores(images, prompts, looks, seeds)
            if mode.regional:
                if alone is None:  # the same for every blend: computed once per group
                    alone = alone_all_identities(adapter, prompts, members, looks, mode.betas[0], seeds, steps, seed=11)
                r["alone_all_identities"] = alone
            rows.append(
                {
                    "group": name,
                    "method": mode.name,
                    "beta": mode.betas[0],
                    **r,
                    "ratio_to_words": r["all_identities"] / base["all_words"] if base["all_words"] else None,
                }
            )
            print(
                f"  {name:24s} {mode.name:18s}: every object its instance {r['all_identities']:.2f} "
                f"(base words, every object as asked {base['all_words']:.2f})",
                flush=True,
            )
            if shown(mode):
                grids.append((f"{name}: {mode.name}", images[::seeds]))
    return rows, grids


def mean_over_instances(rows: list[dict]) -> list[dict]:
    """Per method and beta, fidelity and alignment averaged over the instances (the Pareto plot's points)."""
    keys = sorted(
        {(r["method"], r["beta"]) for r in rows if "instance" in r and not r["method"].startswith("base (words")},
        key=lambda k: (k[0], -1 if k[1] is None else k[1]),
    )
    out = []
    for method, beta in keys:
        sel = [r for r in rows if "instance" in r and (r["method"], r["beta"]) == (method, beta)]
        out.append(
            {
                "method": method,
                "beta": beta,
                "shots": 5 if beta is not None else 0,
                "fidelity": float(np.mean([r["fidelity"] for r in sel])),
                "alignment": float(np.mean([r["alignment"] for r in sel])),
            }
        )
    return out


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"{args.steps} training steps (batch {RECIPE['batch_size']}, learning rates {RECIPE['lr_values']} values / "
        f"{RECIPE['lr_embedding']} embedding, key lock while training: {args.train_lock}, training seed "
        f"{args.train_seed}), {args.seeds} seeds per prompt, DDIM {args.sample_steps} steps, guidance 2.",
        "",
        "| instance | method | beta | identity fidelity | prompt alignment |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "instance" in r:
            beta = "-" if r["beta"] is None else r["beta"]
            lines.append(f"| {r['instance']} | {r['method']} | {beta} | {r['fidelity']:.2f} | {r['alignment']:.2f} |")
    lines += [
        "",
        "| concepts | method | each object its instance | every object its instance | every object as its words ask "
        "| ratio to base words | each alone from its clause, every one its instance |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "group" in r:
            ratio, alone = r.get("ratio_to_words"), r.get("alone_all_identities")
            lines.append(
                f"| {r['group']} | {r['method']} | {r['fidelity']:.2f} | {r['all_identities']:.2f} | "
                f"{r['all_words']:.2f} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                f"{'-' if alone is None else f'{alone:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="World-2 identity/alignment benchmark for any instance folders.")
    p.add_argument("--instance", action="append", default=[], help="DIR[:TOKEN[:SUPERCLASS]] (repeat)")
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--steps", type=int, default=150, help="training steps per concept")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("docs/quality2"))
    p.add_argument(
        "--train-seed", type=int, default=TrainConfig.seed, help="the concepts' training seed (one training is a draw)"
    )
    p.add_argument("--train-lock", choices=TRAIN_LOCKS, default="local", help="the key lock concepts train with")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 training steps, 1 seed, 3 sampling steps")
    p.add_argument(
        "--only",
        choices=("groups", "pairs"),
        help="groups: the pairs and triples only; pairs: the pairs on every background, regional modes only",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.seeds, a.sample_steps = 3, 1, 3
    started = time.monotonic()
    specs = a.instance or [str(f) for f in write_examples(a.out / "instances").values()]
    instances = [instance_of(s) for s in specs]
    for inst in instances:
        print(
            f"instance {inst.token}: {inst.look.colour} {inst.look.pattern} {inst.look.shape}, accent "
            f"{inst.look.accent} (superclass '{inst.superclass}', {inst.folder})"
        )
    adapter = mini.load(a.weights)
    cov = world_covariance(adapter, a.out / "cache", captions=scenes_and_captions)
    concepts = [
        train_concept(adapter, cov, inst, a.steps, a.out, lock=a.train_lock, seed=a.train_seed) for inst in instances
    ]
    rows, grids = benchmark(adapter, instances, concepts, a.seeds, a.sample_steps, a.quick, a.only or "all")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    (a.out / "results.md").write_text(markdown(rows, a))
    if not a.only:
        pareto_plot(
            mean_over_instances(rows), a.out / "pareto.png", ["base (superclass word)", *(m.name for m in MODES)]
        )
    sample_grid(grids, a.out / "samples.png")
    print(f"wrote {a.out} in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
