"""The `perfusion` extra network: prompt tags switch concepts on for one batch.

State is re-applied on every activate (also the empty one the WebUI sends for tag-free prompts), so
nothing carries over from a previous generation, an exception or an interrupt: deactivate is not
guaranteed to run and is not relied on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from modules import extra_networks, prompt_parser, shared

from .. import hooks as engine
from ..concept import Concept, ConceptError
from ..options import BETA, TAU, Lock, Projection
from . import host
from .library import Entry, Library
from .tags import Request, parse_request

INFOTEXT_CONCEPTS = "Perfusion"
INFOTEXT_HASHES = "Perfusion hashes"


@dataclass
class Defaults:
    """What applies when a tag gives no value (the gate sliders, or the settings)."""

    enabled: bool = True
    beta: float = BETA
    tau: float = TAU
    lock: Lock = "local"
    projection: Projection = "approximate"

    @classmethod
    def from_settings(cls) -> "Defaults":
        return cls(True, float(host.option("beta")), float(host.option("tau")), str(host.option("lock")),
                   str(host.option("projection")))


@dataclass
class Applied:
    """One concept as applied to a batch."""

    entry: Entry
    activation: engine.Activation

    def describe(self) -> str:
        beta, tau = self.activation.gate
        return f"{self.entry.name} tau={tau:g} beta={beta:g} lock={self.activation.lock}"


@dataclass
class Runtime:
    """The extension's live state: the library, which U-Net carries hooks, what is on."""

    library: Optional[Library] = None
    hooks: Optional[engine.Hooks] = None
    applied: list[Applied] = field(default_factory=list)
    key_contexts: Optional[engine.KeyContexts] = None
    registered: list[tuple[Any, str, Any]] = field(default_factory=list)  # (db, word, embedding it replaced)
    words: tuple = ()  # (name, token, file stamp) of the embeddings the last conditioning was made with


runtime = Runtime()


def library() -> Library:
    folder = host.concepts_folder()
    if runtime.library is None or runtime.library.folders != [folder]:
        runtime.library = Library([folder])
    return runtime.library


def warn(p: Any, message: str) -> None:
    """A warning in the console and (unless the settings say console only) under the image."""
    print(f"Perfusion: {message}")
    if host.option("warnings") == "UI and console" and hasattr(p, "comment"):
        p.comment(f"Perfusion: {message}")


def switch_off() -> None:
    """Every concept off, our embeddings unregistered (a user's own embedding of the same word is restored)."""
    if runtime.hooks is not None:
        runtime.hooks.clear()
    runtime.applied, runtime.key_contexts = [], None
    model = shared.sd_model
    for item in reversed(runtime.registered):
        if model is not None:
            try:
                host.restore_words(model, [item])
            except Exception as e:  # a DB rebuilt since: nothing of ours left in it
                print(f"Perfusion: could not unregister the embedding of {item[1]!r}: {e}")
    runtime.registered = []


def _hooks_for(model: Any) -> Optional[engine.Hooks]:
    unet = host.diffusion_model(model)
    if unet is None:
        return None
    if runtime.hooks is not None and runtime.hooks.model is not unet:
        runtime.hooks.detach()  # another model was loaded
        runtime.hooks = None
    runtime.hooks = engine.attach(unet)
    return runtime.hooks


def _register_embedding(model: Any, concept: Concept) -> None:
    runtime.registered += host.register_word(
        model, concept.token, host.embedding_vector(concept.embedding, host.text_device(model)),
        host.embedding_size(concept.embedding), filename=f"perfusion:{concept.name}")


def whole_word(word: str) -> re.Pattern:
    """`word` as a whole word, any case (as the concept's word is matched in prompts)."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def _mentions(prompts: list[str], word: str) -> bool:
    return any(whole_word(word).search(text or "") for text in prompts)


def _resolve(p: Any, requests: list[Request], defaults: Defaults, hooks: engine.Hooks) -> list[Applied]:
    lib, applied, seen = library(), [], set()
    for req in requests:
        if req.name.lower() in seen:
            warn(p, f"{req.name} is tagged twice; the first tag is used")
            continue
        seen.add(req.name.lower())
        entry = lib.find(req.name)
        if entry is None:
            known = ", ".join(sorted(lib.entries)[:8]) or "none"
            warn(p, f"no concept named {req.name!r} in {host.concepts_folder()} (known: {known}); skipped")
            continue
        try:
            concept = lib.load(entry)
            hooks.check(concept)
            host.check_embedding(shared.sd_model, concept)
        except ConceptError as e:
            warn(p, f"{e}; skipped")
            continue
        except Exception as e:  # never let one file take the prompt's other concepts (or the image) down
            warn(p, f"{entry.path}: unusable ({type(e).__name__}: {e}); skipped")
            continue
        clip_skip = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
        if concept.clip_skip != clip_skip and concept.arch in ("sd1", "other"):
            warn(p, f"{entry.name} was trained with CLIP skip {concept.clip_skip}, this generation uses {clip_skip}; "
                    "its gate may open less (set Clip skip to match for best likeness)")
        clash = next((a.entry.name for a in applied if a.activation.concept.token.lower() == concept.token.lower()), None)
        if clash is not None:
            warn(p, f"{entry.name} and {clash} share the word {concept.token!r}; {entry.name} skipped")
            continue
        user = user_preferences(entry)
        lock = req.lock or defaults.lock
        if lock == "global" and concept.method != "perfusion":
            warn(p, f"{entry.name} is an Infusion concept (no keys to lock globally); using lock=local")
            lock = "local"
        activation = engine.Activation(concept, beta=_first(req.beta, user.get("beta"), defaults.beta),
                                       tau=_first(req.tau, user.get("tau"), defaults.tau), lock=lock)
        applied.append(Applied(entry, activation))
    return applied


def problem_of(entry: Entry) -> Optional[str]:
    """Why the concept in `entry` cannot be used with the loaded model (file checks only while none is
    loaded); None when it can. What the cards and the API show before anyone generates."""
    try:
        concept = library().load(entry)
        model = shared.sd_model
        unet = host.diffusion_model(model)
        if unet is not None:
            engine.check_fit(concept, engine.find_cross_attention(unet))
            host.check_embedding(model, concept)
    except ConceptError as e:
        return str(e)
    except ValueError:  # a U-Net with several context widths: the generation's own check decides
        return None
    return None


def _first(*values: Optional[float]) -> float:
    return next(float(v) for v in values if v is not None)


def user_preferences(entry: Entry) -> dict:
    """Preferred tau/beta from the card's user metadata (`NAME.json` beside the file), numbers only."""
    meta = extra_networks.get_user_metadata(str(entry.path))
    out = {}
    for key in ("tau", "beta"):
        try:
            out[key] = float(meta[f"preferred_{key}"])
        except (KeyError, TypeError, ValueError):
            pass
    return out


class PerfusionNetwork(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("perfusion")

    def activate(self, p: Any, params_list: list) -> None:
        switch_off()
        self._apply(p, params_list)
        words = tuple((a.entry.name, a.activation.concept.token, a.entry.stamp) for a in runtime.applied)
        if words != runtime.words:  # the WebUI caches conds by prompt and tags, not by the words' embeddings
            host.clear_cond_caches(p)
            runtime.words = words

    def _apply(self, p: Any, params_list: list) -> None:
        defaults = getattr(p, "perfusion_defaults", None) or Defaults.from_settings()
        negatives = [n for n in (getattr(p, "negative_prompts", None) or []) if n and "<perfusion:" in n]
        if negatives:
            warn(p, "tags in the negative prompt are not applied (the WebUI reads tags from the prompt only)")
        if not params_list:
            return
        if not defaults.enabled:
            warn(p, "disabled in the Perfusion accordion; tags ignored")
            return
        model = shared.sd_model
        hooks = _hooks_for(model)
        if hooks is None:
            warn(p, "no model loaded (or its U-Net is replaced, e.g. by TensorRT); tags ignored")
            return
        requests = []
        for params in params_list:
            request, problems = parse_request(params.positional, params.named)
            for problem in problems:
                warn(p, problem)
            if request is not None:
                requests.append(request)
        prompts = list(getattr(p, "prompts", None) or [])
        applied = []
        for a in _resolve(p, requests, defaults, hooks):
            if _mentions(prompts, a.activation.concept.token):
                applied.append(a)
            else:
                warn(p, f"{a.entry.name}: its word {a.activation.concept.token!r} is not in the prompt, so the "
                        f"concept is skipped; write e.g. 'a photo of {a.activation.concept.token}'")
        if not applied:
            return
        for a in applied:
            _register_embedding(model, a.activation.concept)
        runtime.key_contexts = engine.KeyContexts() if any(a.activation.lock == "global" for a in applied) else None
        hooks.activate([a.activation for a in applied], defaults.projection, runtime.key_contexts)
        runtime.applied = applied
        record_infotext(p, applied, defaults.projection)

    def deactivate(self, p: Any) -> None:
        switch_off()


def unload() -> None:
    """Before "Reload UI" or the script's removal: hooks off the U-Net (the next activate re-attaches)."""
    switch_off()
    if runtime.hooks is not None:
        runtime.hooks.detach()
    runtime.hooks = None


def record_infotext(p: Any, applied: list[Applied], projection: str) -> None:
    text = "; ".join(a.describe() for a in applied)
    if len(applied) > 1:
        text += f"; projection={projection}"
    p.extra_generation_params[INFOTEXT_CONCEPTS] = text
    p.extra_generation_params[INFOTEXT_HASHES] = ", ".join(f"{a.entry.name}: {a.entry.shorthash}" for a in applied)


def feed_global_lock(p: Any, cond: Any) -> None:
    """Global key-locking: encode the batch's prompts again with each globally locked concept's word
    replaced by its superclass, and pair every context tensor of `cond` with its twin (prompt schedules
    and AND sub-prompts line up one to one). Called right before each sampling pass."""
    contexts = runtime.key_contexts
    if contexts is None or shared.sd_model is None:
        return
    contexts.clear()
    hires = bool(getattr(p, "is_hr_pass", False))
    prompts = list((p.hr_prompts if hires else p.prompts) or [])
    for a in runtime.applied:
        if a.activation.lock == "global":
            word = whole_word(a.activation.concept.token)
            prompts = [word.sub(a.activation.concept.superclass, text) for text in prompts]
    steps = getattr(p, "firstpass_steps", None) or p.steps
    hires_steps = None
    if hires:
        hires_steps = (getattr(p, "hr_second_pass_steps", 0) or p.steps) * getattr(p, "step_multiplier", 1)
    twins = prompt_parser.get_multicond_learned_conditioning(
        shared.sd_model, prompt_parser.SdConditioning(prompts, width=p.width, height=p.height), steps, hires_steps,
        shared.opts.use_old_scheduling)
    originals, copies = list(host.cond_tensors(cond)), list(host.cond_tensors(twins))
    if len(originals) != len(copies) or any(o.shape != c.shape for o, c in zip(originals, copies)):
        warn(p, "global locking could not pair the prompt's conditioning with its superclass twin; "
                "using lock=local for this image")
        for a in runtime.applied:
            a.activation.lock = "local"
        runtime.key_contexts = None
        runtime.hooks.activate([a.activation for a in runtime.applied], runtime.hooks.activations.projection)
        record_infotext(p, runtime.applied, runtime.hooks.activations.projection)
        return
    for original, twin in zip(originals, copies):
        contexts.add(original, twin)
