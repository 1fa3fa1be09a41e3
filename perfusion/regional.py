"""Regional composition: several concepts in one image, each drawn from its own prompt inside its own region.

Applied together in one prompt, a concept's look travels on the context rows after its word (a causal text
encoder computes them from the learned embedding) to the other objects, and its own object loses it
(docs/world.md). Here every U-Net call on a prompt holding several concepts runs
  * the base prompt: every concept word replaced by its superclass word, no edit (the layout and the other
    objects, as the base model draws words), whose cross-attention on each superclass word locates that
    concept's object: a mask M_k from the running mean over the calls so far (`region_mask`: min-max per image,
    then a steep ramp that hands the object wholly to the concept);
  * each concept's own prompt (its clause of the prompt, `own_prompt`), its edit on, for the prompt's rows only;
and blends the predictions: pred = (1 - sum M_k) pred_base + sum M_k pred_k (sum M_k capped at 1). The blend is
linear, so blending the conditional rows before the host's classifier-free guidance equals blending the guided
predictions. No layout is asked of the user: the base model's own attention places each object.

Where every concept's clause names a place of its own ("at the left", "in the top right corner"), M_k is that
place instead (`concept_places`, `place_mask`), and the blend moves inside the base pass: every cross-attention's
output on the prompt's rows is (1 - sum M_k) attn(base prompt) + sum M_k attn(own prompt k, edit k on), so the
image keeps one layout and each concept draws into its place, in one U-Net pass (`options.RegionBlend`; docs/world.md
measures both blends with both kinds of region).

`RegionalComposition` is the seam: it recognises a registered prompt's context rows in any U-Net call (as
KeyContexts does for global locking) and runs the extra passes there, as forward hooks on the diffusion model
(the engine's sampler, the WebUI hosts) or around a swapped forward (ComfyUI's object patches), and blends in the
cross-attentions through `layer_forward` (wrapped on the instances, or ComfyUI's object patches).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .adapter import Adapter, concept_words
from .concept import Concept
from .diffusion import ddim_sample
from .hooks import Activation, Activations, Editor, KeyContexts, attach
from .masks import QueryKeyCapture, min_max
from .options import (
    PLACE_EDGE,
    PLACE_RADIUS,
    REGION_BLEND,
    REGION_BLENDS,
    REGION_RAMP,
    REGION_SOURCE,
    REGION_SOURCES,
)
from .tokens import as_superclass, whole_word

# Where a prompt splits into clauses (an object with its own words): commas, semicolons, line breaks, "and".
_CLAUSE_BREAK = re.compile(r"\s*(?:[,;\n]|\band\b)\s*", re.IGNORECASE)
# A place in the image, as prompts name one: "at the left", "on the right side", "in the top left corner".
_PLACE = re.compile(
    r"\b(?:at|on|in|to|towards?)\s+the\s+"
    r"(?:(top|upper|bottom|lower)(?:[\s-]+(left|right))?|(left|right)|(centre|center|middle))\b",
    re.IGNORECASE,
)
_ACROSS = {"left": 0.25, "right": 0.75}
_DOWN = {"top": 0.25, "upper": 0.25, "bottom": 0.75, "lower": 0.75}


@dataclass(frozen=True)
class Region:
    """One concept of a regional composition: its activation and, per image, its own prompt."""

    item: Activation
    prompts: list[str]


@dataclass(frozen=True)
class Twins:
    """What regional composition runs in place of one prompt's context [N, d] (every concept word in it).

    base: the prompt with every concept word as its superclass word [N, d]; own: per region, that concept's own
    prompt [N, d] (None where this prompt lacks the concept); rows: per region, the base context's row of the
    superclass word standing for it (None with an own prompt: its pass covers the whole image); own_keys: per
    region, what the key path reads under global locking (own with the concept word as its superclass; empty or
    None: the keys read `own`); places: per region, the centre (x, y) of the place its clause names, in fractions
    of the image's width and height (empty: the regions come from attention; `concept_places`)."""

    base: torch.Tensor
    own: tuple[Optional[torch.Tensor], ...]
    rows: tuple[Optional[int], ...]
    own_keys: tuple[Optional[torch.Tensor], ...] = ()
    places: tuple[Optional[tuple[float, float]], ...] = ()


def own_prompt(prompt: str, word: str, others: Sequence[str]) -> str:
    """`prompt` without the clauses (split at commas, semicolons, line breaks and "and") that name another concept's
    word and not `word`: "a hugsy at the left and a boxy at the right, on the moon" -> "a hugsy at the left, on the
    moon" for hugsy. Measured on the mini world (docs/world.md): a concept drawn from its own clause keeps its look
    far more often than from the whole prompt with the others as words."""
    mine, theirs = whole_word(word), [whole_word(o) for o in others]
    parts = _CLAUSE_BREAK.split(prompt)
    breaks = [m.group(0) for m in _CLAUSE_BREAK.finditer(prompt)]
    kept, seps = [], []
    for i, part in enumerate(parts):
        if mine.search(part) or not any(t.search(part) for t in theirs):
            kept.append(part)
            seps.append(breaks[i - 1] if i and kept[:-1] else "")
    return "".join(s + p for s, p in zip(seps, kept)).strip()


def named_place(clause: str) -> Optional[tuple[float, float]]:
    """The centre (x, y) of the place `clause` names, in fractions of the image's width and height: "at the left"
    (0.25, 0.5), "in the top right corner" (0.75, 0.25), "in the middle" (0.5, 0.5); None where it names none, or
    two different ones."""
    found = set()
    for down, corner, across, _centre in _PLACE.findall(clause):
        side = across or corner
        found.add((_ACROSS[side.lower()] if side else 0.5, _DOWN[down.lower()] if down else 0.5))
    return found.pop() if len(found) == 1 else None


def concept_places(text: str, words: Sequence[str]) -> Optional[tuple[tuple[float, float], ...]]:
    """Per concept word (each in `text`): the place named in its clause (the part of `text` between clause breaks
    that holds the word), when every word's clause names one and no two the same; None otherwise (the regions
    then come from attention)."""
    parts = _CLAUSE_BREAK.split(text)
    places = []
    for word in words:
        clause = next((p for p in parts if whole_word(word).search(p)), None)
        place = None if clause is None else named_place(clause)
        if place is None:
            return None
        places.append(place)
    return tuple(places) if len(set(places)) == len(places) else None


def place_mask(centre: tuple[float, float], size: tuple[int, int], radius: float = PLACE_RADIUS) -> torch.Tensor:
    """[h, w] in [0, 1]: an ellipse around `centre` (fractions of the width and height) with radii `radius` of
    them, 1 inside, 0 outside, linear over +- PLACE_EDGE of a radius at the edge."""
    h, w = size
    (cx, cy), edge = centre, PLACE_EDGE
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    d = (((xs[None, :] - cx) / radius) ** 2 + ((ys[:, None] - cy) / radius) ** 2).sqrt()
    return ((1 + edge - d) / (2 * edge)).clamp(0, 1)


@dataclass(frozen=True)
class TwinPlan:
    """The texts regional composition encodes for one prompt text that names concepts: `base` (every concept word
    as its superclass word), `own` {concept index: its clause} and, for globally locked ones, `keys` {index: the
    clause with its word as the superclass word, what its keys read}."""

    text: str
    base: str
    own: dict[int, str]
    keys: dict[int, str]

    def texts(self) -> set[str]:
        return {self.base, *self.own.values(), *self.keys.values()}

    def twins(
        self, encoded: Mapping[str, torch.Tensor], base_rows: Mapping[str, Sequence[int]], items: Sequence[Activation]
    ) -> Twins:
        """The Twins from each text's encoding [N, d] and the base text's superclass rows. A text that names one
        concept gets no mask row: its own pass covers the image (the concept applied as usual). In a text that
        names several, a concept whose superclass row is not found sits it out; where each of those that stay
        names a place of its own, the places go with them (`concept_places`)."""
        n = len(items)
        rows: tuple[Optional[int], ...] = (None,) * n
        own = dict(self.own)
        places: tuple[Optional[tuple[float, float]], ...] = ()
        if len(own) > 1:
            rows = superclass_rows(self.text, base_rows, [i.concept for i in items])
            own = {k: t for k, t in own.items() if rows[k] is not None}
            named = concept_places(self.text, [items[k].concept.token for k in own]) if len(own) > 1 else None
            if named is not None:
                where = dict(zip(own, named))
                places = tuple(where.get(k) for k in range(n))
        return Twins(
            encoded[self.base],
            tuple(encoded[own[k]] if k in own else None for k in range(n)),
            rows,
            tuple(encoded[self.keys[k]] if k in self.keys and k in own else None for k in range(n)),
            places,
        )


def plan_twins(text: str, items: Sequence[Activation]) -> Optional[TwinPlan]:
    """What to encode for `text`; None when it names none of the concepts (it runs as the bare model)."""
    tokens = [i.concept.token for i in items]
    present = [k for k, t in enumerate(tokens) if whole_word(t).search(text)]
    if not present:
        return None
    base = as_superclass(text, [i.concept for i in items])
    own = {k: own_prompt(text, tokens[k], [tokens[j] for j in present if j != k]) for k in present}
    keys = {k: as_superclass(own[k], [items[k].concept]) for k in present if items[k].lock == "global"}
    return TwinPlan(text, base, own, keys)


def region_mask(attention: torch.Tensor, ramp: tuple[float, float] = REGION_RAMP) -> torch.Tensor:
    """The region [n, h, w] in [0, 1] from attention maps [n, h, w] (any scale): min-max per image, then 0 up to
    ramp[0], 1 from ramp[1], linear between."""
    lo, hi = ramp
    return ((min_max(attention) - lo) / (hi - lo)).clamp(0, 1)


def blend(base: torch.Tensor, own: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1 - sum M_k) base + sum M_k own_k for predictions [n, C, h, w] and masks [n, h, w] in [0, 1]; where the
    masks add up to more than 1 they are scaled down to sum 1."""
    total = torch.stack(list(masks)).sum(0)
    scale = 1 / total.clamp(min=1)
    out = base * (1 - total * scale)[:, None]
    for pred, mask in zip(own, masks):
        out = out + pred * (mask * scale)[:, None]
    return out


def hide_others(x: torch.Tensor, regions: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The latent x [n, C, h, w] as concept k's own pass sees it: every other concept's region (regions [K, n, h, w]
    in [0, 1], outside region k) made background, i.e. each channel's mean over the pixels in no region plus noise
    of their spread there (the same noise for every row, from `seed`). Its prediction is kept inside region k only,
    but the convolutions carry what lies next to it inside: another object's colours would come out in this
    concept's object (docs/world.md)."""
    if len(regions) < 2:
        return x
    others = torch.cat([regions[:k], regions[k + 1 :]]).amax(0)
    hidden = (others * (1 - regions[k]))[:, None].to(x)  # [n, 1, h, w]
    background = (1 - regions.amax(0))[:, None].to(x)
    background = torch.where(background.sum((2, 3), keepdim=True) >= 1, background, 1 - hidden)  # no pixel is free
    area = background.sum((2, 3), keepdim=True).clamp(min=1)
    mean = (x * background).sum((2, 3), keepdim=True) / area
    spread = ((x - mean).square() * background).sum((2, 3), keepdim=True).div(area).sqrt()
    # one noise for every row: a row's view does not depend on its place in the batch
    noise = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x)
    return x * (1 - hidden) + (mean + spread * noise) * hidden


def base_prompts(prompts: list[str], regions: Sequence[Region]) -> list[str]:
    """The prompts with every region's concept word (whole words, any case) replaced by its superclass word."""
    return [as_superclass(text, [r.item.concept for r in regions]) for text in prompts]


def superclass_rows(
    text: str, base_rows: Mapping[str, Sequence[int]], concepts: Sequence[Concept]
) -> tuple[Optional[int], ...]:
    """Per concept: the row, in the base text (`text` with every concept word as its superclass word), of the
    superclass word that stands where the concept's word first stands in `text`; None where `text` lacks the word
    (or the base text has too few occurrences). base_rows: {superclass: the rows of its occurrences in the base
    text, in order}. Those occurrences come in text order: the ones written in `text`, and the concept words
    that share the superclass."""
    out = []
    for c in concepts:
        first = whole_word(c.token).search(text)
        if first is None:
            out.append(None)
            continue
        head = text[: first.start()]
        before = len(whole_word(c.superclass).findall(head))
        before += sum(
            len(whole_word(o.token).findall(head)) for o in concepts if o is not c and o.superclass == c.superclass
        )
        rows = list(base_rows.get(c.superclass, []))
        out.append(rows[before] if before < len(rows) else None)
    return tuple(out)


def mask_rows(adapter: Adapter, prompts: list[str], bases: list[str], regions: Sequence[Region]) -> list[list[int]]:
    """Per region, per image: the base prompt's row of the superclass word that stands where the region's concept
    word stood (superclass_rows)."""
    concepts = [r.item.concept for r in regions]
    _, base_rows = adapter.encode(bases, {c.superclass: None for c in concepts})
    out = [[0] * len(prompts) for _ in regions]
    for b, prompt in enumerate(prompts):
        rows = superclass_rows(prompt, {s: v[b] for s, v in base_rows.items()}, concepts)
        for k, row in enumerate(rows):
            if row is None:
                raise ValueError(f"prompt {b} ({prompt!r}) does not contain the concept word {concepts[k].token!r}")
            out[k][b] = row
    return out


# The ComfyUI family's samplers (ComfyUI, Forge, Forge Neo) batch chunks, one conditioning's rows each, and say
# in the call's transformer_options what each chunk is: lists with an entry per chunk, lists of row indices.
_PER_CHUNK = ("cond_or_uncond", "uuids")
_ROW_INDICES = {"cond_indices": 0, "uncond_indices": 1}


def batch_slice(value: Any, index: torch.Tensor, size: int) -> Any:
    """`value` with every tensor whose first dimension is the batch (`size`) cut to `index`, through dicts,
    lists and tuples (a U-Net's extra inputs: SDXL's y, ControlNet residuals); a `transformer_options` dict also
    gets its chunk lists for those rows (`_chunk_options`)."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.dim() and value.shape[0] == size else value
    if isinstance(value, dict):
        return {
            k: batch_slice(_chunk_options(v, index.tolist(), size) if k == "transformer_options" else v, index, size)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(batch_slice(v, index, size) for v in value)
    return value


def _chunk_options(options: Any, index: list[int], size: int) -> Any:
    """A pass on rows `index` of the sampler's batch of `size` rows sees only those rows: whole chunks (in order)
    keep their entries, other rows become a chunk each (the sampler's chunks share one timestep), and the row
    indices of cond and uncond count in the pass's batch. So a patch that finds the unconditional chunk by
    cond_or_uncond (self-attention guidance keeps its attention) does not take a concept's pass for it."""
    kinds = options.get("cond_or_uncond") if isinstance(options, dict) else None
    if not isinstance(kinds, list) or not kinds or size % len(kinds):
        return options
    rows = size // len(kinds)
    chunks = [i // rows for i in index]
    out = dict(options)
    if len(index) % rows == 0 and all(i == chunks[j] * rows + j % rows for j, i in enumerate(index)):
        picked = chunks[::rows]
    else:
        picked = chunks
        sigmas = options.get("sigmas")
        if isinstance(sigmas, torch.Tensor) and sigmas.dim() and sigmas.shape[0] == rows:
            out["sigmas"] = sigmas[:1]
    for key in _PER_CHUNK:
        if isinstance(options.get(key), list) and len(options[key]) == len(kinds):
            out[key] = [options[key][c] for c in picked]
    for key, kind in _ROW_INDICES.items():
        if key in options:
            out[key] = [j for j, c in enumerate(chunks) if kinds[c] == kind]
    return out


# Rows an extension may put before a prompt's context rows (A1111's ControlNet: one, marking cond or uncond).
MAX_LEAD_ROWS = 1


class RegionalComposition:
    """Composes `items` region by region in every call of a diffusion model (model(x, t, context=..., ...)) where a
    batch row's context is one added with `add` (module docstring); rows that match nothing (the unconditional
    ones) run as the bare model. `editor` is what edits that model's cross-attention: its activations stay empty,
    each concept is switched on only for its own pass. The seam is either forward hooks on `model` (given) or the
    object itself wrapping a forward: `composition(forward, *args, **kwargs)`. `detach()` removes the hooks.

    The masks start again whenever the timestep goes up or the latent size changes (a new image, a hires pass);
    `pairs` keeps the newest `limit` registrations (None: all; a long-lived host that never clears them).

    regions (options.RegionSource): "places" takes a region from the place a prompt's clauses name where its
    Twins carry places (an ellipse, `place_mask`), "attention" always from the base pass's attention.
    blend (options.RegionBlend): "prediction" runs a U-Net pass per concept and blends the predictions;
    "attention" runs the call once and blends inside every cross-attention of `editor` (`layer_forward`; with
    `model` given, wrapped on the instances until `detach`): the rows of a registered prompt get, at each pixel,
    (1 - sum M_k) attn(base prompt) + sum M_k attn(concept k's own prompt, its edit on), with M_k from the
    running attention plus this call's layers so far, or the places; "auto" blends by attention a call whose
    composed prompts all have their regions from places, by prediction otherwise."""

    def __init__(
        self,
        editor: Editor,
        items: Sequence[Activation],
        projection: str = "approximate",
        *,
        model: Optional[torch.nn.Module] = None,
        limit: Optional[int] = None,
        atol: float = 1e-3,
        blend: str = REGION_BLEND,
        regions: str = REGION_SOURCE,
    ):
        if blend not in REGION_BLENDS:
            raise ValueError(f"blend must be one of {REGION_BLENDS}, got {blend!r}")
        if regions not in REGION_SOURCES:
            raise ValueError(f"regions must be one of {REGION_SOURCES}, got {regions!r}")
        self.editor, self.items, self.projection, self.atol, self.limit = editor, list(items), projection, atol, limit
        self.blend, self.regions = blend, regions
        self.pairs: list[tuple[torch.Tensor, Twins]] = []
        self.running: dict[int, torch.Tensor] = {}  # batch row -> [regions, h, w]: attention summed over calls
        self.composed = 0  # U-Net calls in which a registered context was found (a host's check that it works)
        self._call: Optional[tuple] = None
        self._attend: Optional[_AttentionCall] = None
        self._last_t: Optional[float] = None
        editor.clear()
        self._handles = []
        # layer -> (module, its instance forward before, ours)
        self._wrapped: dict[str, tuple[torch.nn.Module, Any, Callable]] = {}
        self._seams: set[str] = set()  # the layers whose forward is composed (layer_forward)
        if blend != "prediction" and model is not None:
            for name, module in editor.layers.items():
                before, module.forward = vars(module).get("forward"), self.layer_forward(name, module.forward)
                self._wrapped[name] = (module, before, module.forward)
        if model is not None:
            self._handles = [
                model.register_forward_pre_hook(lambda m, a, kw: self._before(a, kw), with_kwargs=True),
                model.register_forward_hook(
                    lambda m, a, kw, out: self._after(m.forward, out, whole="forward" in vars(m)), with_kwargs=True
                ),
            ]

    def __call__(self, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        """forward(*args, **kwargs) composed (the seam for a host that swaps the model's forward)."""
        replaced = self._before(args, kwargs)
        out = forward(*args, **kwargs) if replaced is None else forward(*replaced[0], **replaced[1])
        composed = self._after(forward, out)
        return out if composed is None else composed

    def add(self, context: torch.Tensor, twins: Sequence[Twins]) -> None:
        """Register a batch of prompts' contexts [B, N, d] with one Twins each."""
        if len(twins) != context.shape[0]:
            raise ValueError(f"{len(twins)} twins for {context.shape[0]} contexts")
        for c, t in zip(context, twins):
            if len(t.own) != len(self.items) or len(t.rows) != len(self.items):
                raise ValueError(f"twins for {len(t.own)} regions, {len(self.items)} concepts composed")
            self.pairs.append((c.detach(), t))
        if self.limit is not None:
            del self.pairs[: max(0, len(self.pairs) - self.limit)]

    def reset(self) -> None:
        """Forget the masks (a new image)."""
        self.running.clear()
        self._last_t = None

    def clear(self) -> None:
        """Forget the registered prompts, the masks and the count of composed calls (a new batch)."""
        self.pairs.clear()
        self.reset()
        self.composed = 0

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, before, ours in self._wrapped.values():
            if vars(module).get("forward") is not ours:
                continue  # another extension's forward sits over ours now: it restores what it found
            if before is None:
                del module.forward
            else:
                module.forward = before
        self._handles, self.pairs, self._call, self._attend, self._wrapped = [], [], None, None, {}
        self._seams = set()
        self.reset()

    def _match(self, e: torch.Tensor) -> Optional[tuple[Twins, Callable[[torch.Tensor], torch.Tensor]]]:
        """The twins of a batch row's context [N, d] and how to bring a twin to its length: hosts lengthen a
        prompt's rows to batch it with a longer negative prompt, with copies of it (Forge, ComfyUI) or with the
        empty prompt's rows (A1111's pad_cond_uncond), so a registered context may be only the row's start; and an
        extension may put a row before it (A1111's ControlNet marks each prompt cond or uncond with one), kept."""
        for lead in range(MAX_LEAD_ROWS + 1):
            found = self._match_from(e[lead:])
            if found is not None:
                twins, fit = found
                return twins, (fit if not lead else lambda t, head=e[:lead], f=fit: torch.cat([head.to(t), f(t)]))
        return None

    def _match_from(self, e: torch.Tensor) -> Optional[tuple[Twins, Callable[[torch.Tensor], torch.Tensor]]]:
        for c, twins in reversed(self.pairs):  # the newest registration of a context wins
            n = c.shape[0]
            if c.shape[1:] != e.shape[1:] or n > e.shape[0] or not _close(e[:n], c, self.atol):
                continue
            if e.shape[0] == n:
                return twins, lambda t: t
            if e.shape[0] % n == 0 and _close(e, c.to(e.device).repeat(e.shape[0] // n, 1), self.atol):
                return twins, lambda t, r=e.shape[0] // n: t.repeat(r, 1)
            return twins, lambda t, tail=e[n:]: torch.cat([t.to(tail), tail])
        return None

    def _before(self, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        """The call's arguments with the base prompt in the registered rows (None: leave the call alone)."""
        self._call, self._attend = None, None
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        if context is None or self.editor.activations.items:
            return None  # not a text-conditioned call, or someone switched concepts on: leave it alone
        matched = [(b, *found) for b in range(context.shape[0]) if (found := self._match(context[b])) is not None]
        if not matched:
            return None
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor) and t.numel():
            now = float(t.max())
            if self._last_t is not None and now > self._last_t:  # the sampler starts again: a new image
                self.running.clear()
            self._last_t = now
        self.composed += 1
        base = context.clone()
        for b, twins, fit in matched:
            base[b] = _fit(fit(twins.base.to(base.device, base.dtype)), base.shape[1])
        capture = QueryKeyCapture(self.editor.layers).__enter__()
        self._call = (args, kwargs, context, matched, capture)
        # blend by attention unless an extension put rows before a prompt (A1111's ControlNet drops its mark row
        # before the cross-attentions see the context), which the prediction blend handles
        attend = self._seams == set(self.editor.layers) and (
            self.blend == "attention" or (self.blend == "auto" and all(self._placed(t) for _, t, _ in matched))
        )
        if attend and all(self._match_from(context[b]) is not None for b, _, _ in matched):
            x = args[0] if args else kwargs["x"]
            self._attend = self._attention_call(context, matched, tuple(x.shape[-2:]))
        if "context" in kwargs:
            return args, {**kwargs, "context": base}
        return (*args[:2], base, *args[3:]), kwargs

    def _after(self, forward: Callable, output: Any, whole: bool = False) -> Any:
        """The call's output with the registered rows composed (None: unchanged). whole: each concept's pass runs on
        the call's whole batch (the other rows as they came, their output unused), for a forward that another
        extension swapped in and that may keep state shaped by the batch (A1111's ControlNet caches its reference
        latents per batch); otherwise on the rows it composes only."""
        if self._call is None:
            return None
        args, kwargs, context, matched, capture = self._call
        self._call = None
        capture.__exit__(None, None, None)
        attend, self._attend = self._attend, None
        if attend is not None and attend.blended:  # blended inside the cross-attentions: keep the masks' sums
            for j, (b, _, _) in enumerate(matched):
                self.running[b] = attend.running[:, j] + attend.seen[:, j]
            return None
        # no layer blended (another extension put its own forward on the attn2 modules after ours): by prediction
        if not isinstance(output, torch.Tensor):
            return None
        x = args[0] if args else kwargs["x"]
        size = tuple(x.shape[-2:])
        index = [b for b, _, _ in matched]
        masks = self._masks(capture, matched, size)  # [regions, matched, h, w]
        # [regions, matched]: whether a row's concept has a region (its own prompt and its superclass row)
        known = torch.tensor(
            [[t.own[k] is not None and t.rows[k] is not None for _, t, _ in matched] for k in range(len(self.items))],
            device=masks.device,
        )
        regions = masks * known[:, :, None, None]  # [regions, matched, h, w]: 0 where a region is unknown
        latents = x[index]
        preds, weights = [], []
        for k in range(len(self.items)):
            groups = _own_groups(matched, k, whole)
            if not groups:
                continue
            full = output[index].clone()
            for mine in groups:
                rows = [matched[j] for j in mine]
                own_x = hide_others(latents[mine], regions[:, mine], k, self._seed(k))
                full[mine] = self._own_pass(forward, args, kwargs, context, rows, k, whole, own_x).to(full)
            mask = torch.zeros(len(matched), *size, device=output.device, dtype=output.dtype)
            mask[[j for mine in groups for j in mine]] = 1.0  # a concept alone in its prompt: everywhere
            mask = torch.where(known[k, :, None, None].to(mask.device), regions[k].to(mask), mask)
            preds.append(full)
            weights.append(mask)
        if not preds:
            return None
        out = output.clone()
        out[index] = blend(output[index], preds, weights)
        return out

    def _own_pass(
        self,
        forward: Callable,
        args: tuple,
        kwargs: dict,
        context: torch.Tensor,
        rows: list,
        k: int,
        whole: bool,
        own_x: torch.Tensor,
    ) -> torch.Tensor:
        """The U-Net's prediction for the batch rows `rows` (matched entries) with concept k's own prompt, only its
        edit on, and `own_x` [len(rows), C, h, w] as their latent: a call on those rows, or (whole) on the whole
        batch with the own prompt and latent in those rows (the prompt brought to the call's length as _fit does)."""
        index = torch.as_tensor([b for b, _, _ in rows])
        size, length = context.shape[0], context.shape[1]
        own = [fit(t.own[k].to(context)) for _, t, fit in rows]
        if whole:
            own = [_fit(o, length) for o in own]
        own = torch.stack(own)
        activation = self._activation(k, rows, own)
        if whole:
            sub_args, sub_kwargs = args, dict(kwargs)
            own = context.clone().index_copy_(0, index.to(context.device), own)
            x = args[0] if args else kwargs["x"]
            own_x = x.clone().index_copy_(0, index.to(x.device), own_x.to(x))
        else:
            sub_args, sub_kwargs = batch_slice(args, index, size), batch_slice(kwargs, index, size)
        if args:
            sub_args = (own_x, *sub_args[1:])
        else:
            sub_kwargs["x"] = own_x
        if "context" in kwargs:
            sub_kwargs["context"] = own
        else:
            sub_args = (*sub_args[:2], own, *sub_args[3:])
        self.editor.activate(activation)
        try:
            out = forward(*sub_args, **sub_kwargs)
        finally:
            self.editor.clear()
        return out[index.to(out.device)] if whole else out

    def _seed(self, k: int) -> int:
        """The seed of concept k's hidden places' noise in this call: the same for the same timestep (a
        reproducible image), another for each concept and step."""
        return 1_000_003 * k + (round(self._last_t * 1_000) if self._last_t is not None else 0)

    def _running(self, b: int, blank: torch.Tensor) -> torch.Tensor:
        """Batch row b's attention summed over the earlier calls [regions, h, w]; `blank` (zeros) at the first call
        or a new size (hires fix)."""
        before = self.running.get(b)
        return blank if before is None or before.shape != blank.shape else before.to(blank)

    def _placed(self, twins: Twins) -> bool:
        """Whether a prompt's regions come from the places it names."""
        return self.regions == "places" and any(p is not None for p in twins.places)

    def _place_masks(self, matched: list, size: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[regions, m, h, w]: the region of each place named, and [regions, m]: where one is (bool)."""
        masks = torch.zeros(len(self.items), len(matched), *size, device=device)
        named = torch.zeros(len(self.items), len(matched), dtype=torch.bool)
        for j, (_, twins, _) in enumerate(matched):
            if not self._placed(twins):
                continue
            for k, place in enumerate(twins.places):
                if place is not None:
                    masks[k, j], named[k, j] = place_mask(place, size).to(device), True
        return masks, named

    def _activation(self, k: int, rows: list, own: torch.Tensor) -> Activations:
        """Concept k alone, for a pass whose rows (matched entries) read their own prompts `own` [g, N, d]; a
        globally locked one's key path reads them with the concept word as its superclass."""
        item = self.items[k]
        keys = None
        if item.lock == "global" and all(k < len(t.own_keys) and t.own_keys[k] is not None for _, t, _ in rows):
            keys = KeyContexts()
            keys.add(own, torch.stack([_fit(fit(t.own_keys[k].to(own)), own.shape[1]) for _, t, fit in rows]))
        return Activations([item], self.projection, keys)

    def _attention_call(self, context: torch.Tensor, matched: list, size: tuple) -> _AttentionCall:
        """What the cross-attentions of one call need to blend (blend "attention")."""
        regions = len(self.items)
        blank = torch.zeros(regions, *size, device=context.device)
        running = torch.stack([self._running(b, blank) for b, _, _ in matched], 1)
        passes = []
        for k in range(regions):
            for mine in _own_groups(matched, k):
                rows = [matched[j] for j in mine]
                own = torch.stack([fit(t.own[k].to(context)) for _, t, fit in rows])
                passes.append((k, mine, own, self._activation(k, rows, own)))
        rows = _mask_rows(matched, regions)
        known = torch.tensor([[t.rows[k] is not None for _, t, _ in matched] for k in range(regions)])
        places, named = self._place_masks(matched, size, context.device)
        return _AttentionCall(
            [b for b, _, _ in matched],
            context.shape[0],
            size,
            rows,
            known,
            passes,
            running,
            torch.zeros_like(running),
            places,
            named,
        )

    def layer_forward(self, name: str, original: Callable) -> Callable:
        """Cross-attention layer `name`'s forward `original`, blending a registered prompt's rows while a call is
        composed by attention. With `model` given the object puts these on the layers' instances itself; a host
        that patches module forwards its own way (ComfyUI's object patches) puts them on every layer, or the
        calls are composed by prediction."""
        self._seams.add(name)

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            call, attend = self._call, self._attend
            if attend is None or call is None or not isinstance(out, torch.Tensor) or out.shape[0] != attend.size:
                return out
            return self._attend_layer(name, original, call[4], attend, args, kwargs, out)

        return forward

    def _attend_layer(
        self, name: str, original: Callable, capture: QueryKeyCapture, attend: _AttentionCall, args, kwargs, out
    ) -> torch.Tensor:
        """out [B, hw, C] (the layer's output on the base prompt) with the composed rows blended."""
        index = torch.as_tensor(attend.batch)
        attend.blended += 1
        attend.seen += capture.layer_attention(name, attend.rows, attend.latent, batch=attend.batch).to(attend.seen)
        total = attend.running + attend.seen  # [regions, m, H, W]
        masks = torch.stack([region_mask(total[k]) for k in range(len(self.items))])
        masks = torch.where(attend.named[:, :, None, None].to(masks.device), attend.places.to(masks), masks)
        masks = torch.where(attend.known[:, :, None, None].to(masks.device), masks, torch.ones_like(masks))
        (h, w), hw = attend.latent, out.shape[1]
        side = int(round((hw * w / h) ** 0.5))
        masks = F.interpolate(masks.flatten(0, 1)[:, None], size=(hw // side, side), mode="area")
        masks = masks.reshape(len(self.items), len(attend.batch), hw).to(out)
        mine = out[index.to(out.device)]
        preds, weights = {}, {}
        for k, js, own, activation in attend.passes:
            rows = index[js]
            sub_args, sub_kwargs = batch_slice(args, rows, attend.size), batch_slice(kwargs, rows, attend.size)
            if "context" in kwargs or len(args) < 2:
                sub_kwargs["context"] = own.to(out)
            else:
                sub_args = (sub_args[0], own.to(out), *sub_args[2:])
            self.editor.activate(activation)
            try:
                y = original(*sub_args, **sub_kwargs)
            finally:
                self.editor.clear()
            if k not in preds:
                preds[k], weights[k] = mine.clone(), torch.zeros_like(masks[k])
            preds[k][js] = y.to(mine)
            weights[k][js] = masks[k, js]
        if not preds:
            return out
        out = out.clone()
        out[index.to(out.device)] = blend(
            mine.transpose(1, 2), [p.transpose(1, 2) for p in preds.values()], list(weights.values())
        ).transpose(1, 2)
        return out

    def _masks(self, capture: QueryKeyCapture, matched: list, size: tuple) -> torch.Tensor:
        """[regions, matched, h, w]: each region's mask in each matched row (0 where its row is unknown): the place
        named, or from the running sum of the base pass's attention on the region's superclass row."""
        rows = _mask_rows(matched, len(self.items))
        maps = capture.row_attention(rows, size, batch=[b for b, _, _ in matched])  # [regions, matched, h, w]
        out = torch.zeros_like(maps)
        for j, (b, t, _) in enumerate(matched):
            running = self._running(b, torch.zeros_like(maps[:, j])) + maps[:, j]
            self.running[b] = running
            for k in range(len(self.items)):
                if t.rows[k] is not None:
                    out[k, j] = region_mask(running[k][None])[0]
        places, named = self._place_masks(matched, size, out.device)
        return torch.where(named[:, :, None, None].to(out.device), places.to(out), out)


def _own_groups(matched: list, k: int, whole: bool = False) -> list[list[int]]:
    """The positions in `matched` of the rows with concept k, grouped by their own prompt's length (one pass per
    length; whole: one group, the pass brings each to the call's length)."""
    groups: dict[int, list[int]] = {}
    for j, (_, twins, fit) in enumerate(matched):
        if twins.own[k] is not None:
            groups.setdefault(0 if whole else fit(twins.own[k]).shape[0], []).append(j)
    return list(groups.values())


def _mask_rows(matched: list, regions: int) -> list[list[int]]:
    """Per region, per matched row: the base prompt's superclass row (0 where unknown)."""
    return [[t.rows[k] if t.rows[k] is not None else 0 for _, t, _ in matched] for k in range(regions)]


@dataclass
class _AttentionCall:
    """One U-Net call composed inside its cross-attentions: the batch rows composed (`batch`, of `size` rows), the
    latent's (h, w), per region the base prompt's superclass row of each composed row (`rows`, [regions][m]) and
    whether it is known (`known` [regions, m]: otherwise the concept's prompt covers the image), the own passes
    (concept, composed-row positions, own contexts [g, N, d], activation), the attention on the superclass rows
    [regions, m, h, w]: summed over the earlier calls (`running`) and over this call's layers so far (`seen`), and
    the regions of the places named."""

    batch: list[int]
    size: int
    latent: tuple[int, int]
    rows: list[list[int]]
    known: torch.Tensor
    passes: list[tuple[int, list[int], torch.Tensor, Activations]]
    running: torch.Tensor
    seen: torch.Tensor
    places: torch.Tensor  # [regions, m, h, w]: the regions of named places, where `named` [regions, m]
    named: torch.Tensor
    blended: int = 0  # layers that blended so far


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return torch.allclose(a.float(), b.to(a.device).float(), atol=atol, rtol=1e-3)


def _fit(rows: torch.Tensor, n: int) -> torch.Tensor:
    """rows [M, d] cut or lengthened (its last row repeated) to [n, d]: a twin whose words took another number of
    75-token chunks than the prompt's."""
    if rows.shape[0] >= n:
        return rows[:n]
    return torch.cat([rows, rows[-1:].repeat(n - rows.shape[0], 1)])


@torch.no_grad()
def generate_regional(
    adapter: Adapter,
    prompts: list[str],
    regions: Sequence[Region],
    *,
    latent_shape: tuple[int, ...],
    seed: int = 0,
    steps: int = 25,
    guidance: float = 2.0,
    eta: float = 1.0,
    negative: str = "",
    projection: str = "approximate",
    blend: str = REGION_BLEND,
    regions_from: str = REGION_SOURCE,
) -> torch.Tensor:
    """Images [n, 3, R, R] in [-1, 1]: `prompts` (each holding every region's concept word) composed region by
    region (module docstring; `blend` and `regions_from` as RegionalComposition's blend and regions); the same
    sampler, noise and guidance as generate()."""
    n = len(prompts)
    if any(len(r.prompts) != n for r in regions):
        raise ValueError(f"every region needs one prompt per image ({n})")
    hooks = attach(adapter.diffusion_model, context_dim=adapter.context_dim)
    saved = hooks.activations
    items = [r.item for r in regions]
    cond, _ = adapter.encode(prompts, concept_words([i.concept for i in items]))
    bases = base_prompts(prompts, regions)
    base, _ = adapter.encode(bases)
    uncond, _ = adapter.encode([negative] * n)
    rows = mask_rows(adapter, prompts, bases, regions)
    own = [adapter.encode(r.prompts, concept_words([r.item.concept]))[0] for r in regions]
    own_keys = [adapter.encode(base_prompts(r.prompts, [r]))[0] if r.item.lock == "global" else None for r in regions]
    twins = [
        Twins(
            base[b],
            tuple(o[b] for o in own),
            tuple(r[b] for r in rows),
            tuple(None if k is None else k[b] for k in own_keys),
            concept_places(prompts[b], [i.concept.token for i in items]) or (),
        )
        for b in range(n)
    ]
    composition = RegionalComposition(hooks, items, projection, model=hooks.model, blend=blend, regions=regions_from)
    composition.add(cond, twins)
    try:
        latents = ddim_sample(
            adapter.apply_model,
            adapter.alphas_cumprod,
            cond,
            uncond,
            (n, *latent_shape),
            adapter.prediction,
            steps=steps,
            eta=eta,
            guidance=guidance,
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        composition.detach()
        hooks.activate(saved)
    return adapter.decode_latents(latents).clamp(-1, 1)
