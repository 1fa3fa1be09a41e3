"""Forward hooks on every cross-attention `to_k` / `to_v`: the one seam where concepts enter a U-Net.

Works with any module tree whose cross-attention blocks are named `...attn2` and call
`self.to_k(context)` / `self.to_v(context)` as modules (ldm, sgm, Forge). With no active concept
the hooks return nothing and outputs are bit-identical to the bare model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .concept import Concept, ConceptError
from .edit import edited_output, exact_mix
from .options import LOCKS, PROJECTIONS, Lock, Projection

_HANDLE_ATTR = "_perfusion_hooks"


class ConceptMismatch(ConceptError):
    """A concept that does not fit the model it is applied to (context width or layer set)."""


@dataclass
class Activation:
    """One concept switched on, with its gate and lock (None: the concept file's own).

    ungated: replace the sigmoid gate by the similarity itself (ROME's closed form; an ablation).
    """

    concept: Concept
    beta: Optional[float] = None
    tau: Optional[float] = None
    lock: Optional[Lock] = None
    ungated: bool = False

    def __post_init__(self) -> None:
        if self.lock is None:  # the lock it was trained with
            self.lock = self.concept.lock

    @property
    def gate(self) -> tuple[float, float]:
        """(beta, tau) in use."""
        return (
            self.concept.beta if self.beta is None else self.beta,
            self.concept.tau if self.tau is None else self.tau,
        )


@dataclass
class Activations:
    """What the hooks apply on the next forward.

    key_context: for global locking, maps the context a `to_k` receives [B, N, d] to the
    row-aligned superclass-substituted context (or None to keep it).
    """

    items: list[Activation] = field(default_factory=list)
    projection: Projection = "approximate"
    key_context: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None

    def __len__(self) -> int:
        """How many concepts are active."""
        return len(self.items)


def find_cross_attention(diffusion_model: nn.Module, context_dim: Optional[int] = None) -> dict[str, nn.Module]:
    """{module path: attn2 module} for every cross-attention reading `context_dim`-wide rows.

    Self-attention (attn1) and cross-attention of another width (e.g. an SDXL refiner's 1280) are
    left out. With context_dim None the width must be unique in the model.
    """
    found = {
        name: m
        for name, m in diffusion_model.named_modules()
        if name.rsplit(".", 1)[-1] == "attn2" and hasattr(m, "to_k") and hasattr(m, "to_v")
    }
    widths = {m.to_k.in_features for m in found.values()}
    if context_dim is None:
        if len(widths) > 1:
            raise ValueError(f"cross-attention layers read several context widths {sorted(widths)}: pass context_dim")
        context_dim = widths.pop() if widths else None
    return {name: m for name, m in found.items() if m.to_k.in_features == context_dim}


@dataclass
class _PathStack:
    """The concepts one projection path edits, their vectors stacked [n, ...] on one device."""

    concepts: list[Concept]
    a: torch.Tensor  # [n, d]
    i_star: torch.Tensor  # [n, d]
    i_super: torch.Tensor  # [n, d]
    energy: torch.Tensor  # [n]
    beta: torch.Tensor  # [n]
    tau: torch.Tensor  # [n]
    ungated: Optional[torch.Tensor]  # [n] bool, None when every concept is gated
    projected: list[int]  # positions of the Perfusion concepts (projected out of e; Infusion's are not)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # value targets [n, d_out] per layer
    # W i* and W i_super [n, d_out] per layer: constant while the activation lasts (frozen weights); kept
    # at inference only, so a training step's graph is always its own
    projected_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    _mix: Optional[torch.Tensor] = None

    def mix(self, projection: str) -> Optional[torch.Tensor]:
        """The exact projection's mixing matrix of the projected concepts, computed once (None: approximate)."""
        if projection != "exact" or len(self.projected) < 2:
            return None
        if self._mix is None:
            p = self.projected
            self._mix = exact_mix(self.a[p], self.i_star[p], self.energy[p])
        return self._mix

    @classmethod
    def of(cls, items: list[Activation], device: torch.device, kind: str) -> _PathStack:
        cs = [i.concept for i in items]
        on = lambda rows: torch.stack(rows).to(device)  # noqa: E731
        ungated = [i.ungated or (kind == "k" and i.lock == "hard") for i in items]  # hard: the key edit by s
        return cls(
            cs,
            on([c.a for c in cs]),
            on([c.i_star for c in cs]),
            on([c.i_super for c in cs]),
            on([c.energy.reshape(()) for c in cs]),
            torch.tensor([i.gate[0] for i in items], device=device),
            torch.tensor([i.gate[1] for i in items], device=device),
            torch.tensor(ungated, device=device) if any(ungated) else None,
            [p for p, c in enumerate(cs) if c.method == "perfusion"],
        )


def check_fit(concept: Concept, layers: dict[str, nn.Module]) -> None:
    """Raise ConceptMismatch unless `concept` was made for these cross-attention layers (as
    find_cross_attention gives them): their context width, names and output widths."""
    src = concept.name or concept.token
    context_dim = next(iter(layers.values())).to_k.in_features if layers else None
    if concept.context_dim != context_dim:
        raise ConceptMismatch(
            f"{src}: made for {concept.context_dim}-wide text encodings "
            f"({concept.arch}), this model reads {context_dim}"
        )
    if set(concept.values) != set(layers):
        missing = sorted(set(layers) - set(concept.values))
        foreign = sorted(set(concept.values) - set(layers))
        raise ConceptMismatch(
            f"{src}: its layers do not match this model's cross-attention "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(foreign)} unknown, "
            f"e.g. {foreign[:1]}); it was trained for another architecture"
        )
    for name, attn in layers.items():
        d_out = getattr(attn.to_v, "out_features", None)
        if d_out is not None and concept.values[name].shape[0] != d_out:
            raise ConceptMismatch(
                f"{src}: layer {name} has {concept.values[name].shape[0]} outputs, this model's has {d_out}"
            )


class Editor:
    """The active concepts and the edit they make to one U-Net's cross-attention, with no attachment of its
    own: a host calls `key_input` on what a `to_k` receives and `edit` on what a `to_k`/`to_v` returned.
    `Hooks` drives one through forward hooks; a host whose model patcher swaps module forwards (ComfyUI)
    calls it from the swapped forward.

    cache_rows: keep each layer's W i* / W_K i_super for the activation's later calls (valid while the
    layer's weights stay what they were at the first call; a host that patches weights per clone says False).
    """

    def __init__(self, layers: dict[str, nn.Module], activations: Activations, cache_rows: bool = True):
        self.layers = layers
        self.context_dim = next(iter(layers.values())).to_k.in_features
        self.cache_rows = cache_rows
        self.activations = Activations()
        self._busy = False
        self.activate(activations)

    # -- what is active -------------------------------------------------------------------
    def check(self, concept: Concept) -> None:
        """Raise ConceptMismatch unless `concept` was made for this model's context width and layers."""
        check_fit(concept, self.layers)

    def activate(self, activations: Activations | Sequence[Activation]) -> None:
        """Replace what is active (validated first: on error nothing changes). A plain list of
        activations is Activations(that list): approximate projection, no global locking.

        Stacked concept tensors are cached until the next call; when they require gradients (training),
        call activate again before every forward you backpropagate through."""
        if not isinstance(activations, Activations):
            activations = Activations(list(activations))
        items, projection, key_context = activations.items, activations.projection, activations.key_context
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        for item in items:
            self.check(item.concept)
            if item.lock not in LOCKS:
                raise ValueError(f"lock must be one of {LOCKS}, got {item.lock!r}")
            beta, tau = item.gate
            if not (tau > 0 and beta == beta):
                raise ValueError(f"{item.concept.name or item.concept.token}: tau must be > 0 and beta a number")
            if item.lock == "global" and item.concept.method != "perfusion":
                raise ValueError(f"{item.concept.name}: global locking applies to Perfusion concepts only")
        if key_context is None and any(i.lock == "global" for i in items):
            raise ValueError("global locking needs a key_context (the superclass-substituted context)")
        self.activations = Activations(list(items), projection, key_context)
        self._stacks = {}

    def clear(self) -> None:
        """Switch every concept off (outputs become the bare model's again)."""
        self.activate([])

    # -- the edit -------------------------------------------------------------------------
    def _path(self, kind: str, device: torch.device) -> Optional[_PathStack]:
        """The active concepts one path (to_k "k" or to_v "v") edits, stacked on `device`; None when it
        edits none. Cached until the next activate (Python lists inside: no device sync in the hooks)."""
        key = (kind, device)
        if key not in self._stacks:
            items = self.activations.items
            edit = [
                n
                for n, i in enumerate(items)
                if kind == "v" or (i.concept.method == "perfusion" and i.lock != "global")
            ]
            self._stacks[key] = _PathStack.of([items[n] for n in edit], device, kind) if edit else None
        return self._stacks[key]

    def key_input(self, e: torch.Tensor) -> Optional[torch.Tensor]:
        """What a `to_k` should read instead of `e` [B, N, d] (global locking), or None to keep `e`."""
        acts = self.activations
        if self._busy or acts.key_context is None or not any(i.lock == "global" for i in acts.items):
            return None
        replaced = acts.key_context(e)
        return None if replaced is None else replaced.to(e.dtype)

    def _projected(
        self, path: _PathStack, layer: str, project: Callable, rows: Callable[[], torch.Tensor], dtype
    ) -> torch.Tensor:
        """project(rows()) for this layer's concept rows, kept for the activation's later calls at inference
        (rows() is then built once too); while a graph is built, e.g. in training, every call projects afresh."""
        if torch.is_grad_enabled() or not self.cache_rows:
            return self._project(project, rows(), dtype)
        if layer not in path.projected_rows:
            path.projected_rows[layer] = self._project(project, rows(), dtype)
        return path.projected_rows[layer]

    def _project(self, project: Callable, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """project(x) in fp32, called under the re-entrancy guard (weights may be patched or quantized)."""
        self._busy = True
        try:
            return project(x.to(dtype)).float()
        finally:
            self._busy = False

    def edit(
        self, layer: str, kind: str, project: Callable, e: torch.Tensor, y: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """The edited output of layer `layer`'s to_k ("k") or to_v ("v"), y = project(e) [B, N, d_out], or None
        when nothing applies. `project` is the layer's own projection (called on the concept rows: never its
        `.weight`, which a host may stream or quantize)."""
        if self._busy or not self.activations.items:
            return None
        path = self._path(kind, y.device)
        if path is None:
            return None
        n = len(path.concepts)
        if kind == "v":
            w_i_star = self._projected(path, layer, project, lambda: path.i_star, e.dtype)
            if layer not in path.targets:
                path.targets[layer] = torch.stack([c.values[layer] for c in path.concepts]).to(y.device)
            targets = path.targets[layer]
        else:  # keys: local-locked Perfusion concepts; o*_K stored, or W_K i_super
            missing = [p for p, c in enumerate(path.concepts) if layer not in c.keys]
            both = self._projected(
                path, layer, project, lambda: torch.cat([path.i_star, path.i_super[missing]]), e.dtype
            )
            w_i_star, w_i_super = both[:n], both[n:]
            rows = [c.keys[layer].to(y.device).float() if layer in c.keys else None for c in path.concepts]
            for p, row in zip(missing, w_i_super):
                rows[p] = row
            targets = torch.stack(rows)
        return edited_output(
            y,
            e,
            path.a,
            path.i_star,
            path.energy,
            w_i_star,
            targets,
            path.beta,
            path.tau,
            projected=path.projected,
            projection=self.activations.projection,
            ungated=path.ungated,
            mix=path.mix(self.activations.projection),
        )


class Hooks(Editor):
    """An Editor driven by forward hooks on one U-Net's to_k/to_v. A context manager; `detach()` removes
    them. Use `attach()` to make one."""

    def __init__(self, diffusion_model: nn.Module, layers: dict[str, nn.Module], activations: Activations):
        super().__init__(layers, activations)
        self.model = diffusion_model
        self._handles = []
        for name, attn in layers.items():
            self._handles.append(attn.to_k.register_forward_pre_hook(self._key_input))
            self._handles.append(attn.to_k.register_forward_hook(self._hook(name, "k")))
            self._handles.append(attn.to_v.register_forward_hook(self._hook(name, "v")))

    def _key_input(self, module: nn.Module, args: tuple):
        replaced = self.key_input(args[0])
        return None if replaced is None else (replaced,) + tuple(args[1:])

    def _hook(self, layer: str, kind: str):
        def hook(module: nn.Module, args: tuple, y: torch.Tensor):
            return self.edit(layer, kind, module, args[0], y)

        return hook

    # -- lifetime -------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook; outputs are the bare model's again. Safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(
    diffusion_model: nn.Module, activations: Optional[Activations] = None, context_dim: Optional[int] = None
) -> Hooks:
    """Hook every cross-attention to_k/to_v of `diffusion_model` (idempotent: one set of hooks per model).

    Attaching again returns the same Hooks with `activations` applied (if given).
    """
    existing = getattr(diffusion_model, _HANDLE_ATTR, None)
    if isinstance(existing, Hooks) and existing.attached:
        if activations is not None:
            existing.activate(activations)
        return existing
    layers = find_cross_attention(diffusion_model, context_dim)
    if not layers:
        raise ValueError(
            "no cross-attention layers (modules named '...attn2' with to_k/to_v) "
            f"{'reading ' + str(context_dim) + '-wide context ' if context_dim else ''}found in this model"
        )
    hooks = Hooks(diffusion_model, layers, activations or Activations())
    object.__setattr__(diffusion_model, _HANDLE_ATTR, hooks)
    return hooks


class KeyContexts:
    """Row-aligned lookup for global locking: maps a context batch to its superclass-substituted twin.

    `add(context, key_context)` registers pairs ([B, N, d] each, or [N, d]); calling the object
    with the context a `to_k` receives returns the twin for every batch row that matches a
    registered row (rows that match nothing, e.g. the unconditional ones, are kept). The last
    answer is cached for the same input tensor, so all layers of one forward share one lookup.
    """

    def __init__(self, atol: float = 1e-3, limit: Optional[int] = None):
        self.atol, self.limit = atol, limit  # limit: keep the newest pairs only (a long-lived host)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last = None

    def add(self, context: torch.Tensor, key_context: torch.Tensor) -> None:
        if context.shape != key_context.shape:
            raise ValueError(f"key context {list(key_context.shape)} is not row-aligned with {list(context.shape)}")
        for c, k in zip(context.reshape(-1, *context.shape[-2:]), key_context.reshape(-1, *context.shape[-2:])):
            self.pairs.append((c.detach(), k.detach()))
        if self.limit is not None:
            del self.pairs[: max(0, len(self.pairs) - self.limit)]
        self._last = None

    def clear(self) -> None:
        self.pairs.clear()
        self._last = None

    def __call__(self, e: torch.Tensor) -> Optional[torch.Tensor]:
        version = None if e.is_inference() else e._version  # inference tensors (Forge) have no version counter
        if self._last is not None and self._last[0]() is e and self._last[1] == version:
            return self._last[2]
        out, hit = e, False
        for b in range(e.shape[0]):
            for c, k in reversed(self.pairs):  # the newest pair of a context wins
                if c.shape == e.shape[1:] and torch.allclose(
                    e[b].float(), c.to(e.device).float(), atol=self.atol, rtol=1e-3
                ):
                    if not hit:
                        out, hit = e.clone(), True
                    out[b] = k.to(e.device, e.dtype)
                    break
        result = out if hit else None
        self._last = (weakref.ref(e), version, result)
        return result
