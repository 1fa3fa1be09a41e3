"""The `perfusion` extra network: prompt tags switch concepts on for one batch.

State is re-applied on every activate (also the empty one the WebUI sends for tag-free prompts), so
nothing carries over from a previous generation, an exception or an interrupt: deactivate is not
guaranteed to run and is not relied on. Which concepts apply is decided by resolve.resolve; the state
lives in state.runtime; what the image's parameters say, in infotext.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from modules import extra_networks, prompt_parser

from .. import hooks as engine
from ..concept import Concept, ConceptError
from ..options import (
    BETA_RANGE,
    COMPOSITIONS,
    LOCK_CHOICES,
    PROJECTIONS,
    REGION_BLEND,
    REGION_BLENDS,
    REGION_SOURCE,
    REGION_SOURCES,
    TAU_RANGE,
    activation_lock,
)
from ..tokens import as_superclass
from . import composition, host, infotext
from .library import Entry
from .log import log
from .resolve import Defaults, ModelFacts, check_fit, resolve
from .state import Applied, library, runtime
from .tags import parse_request

# The accordion's values for one generation ride on the WebUI's processing object (the only thing the
# script's process() and the extra network's activate() both see), under this attribute.
GENERATION_DEFAULTS = "perfusion_defaults"
OVERRIDES = "perfusion_xyz"  # {field: value} from the X/Y/Z plot's axes
# the settings an X/Y/Z axis may override: {name: (choices, default)}
SETTINGS_AXES = {"regions": (REGION_SOURCES, REGION_SOURCE), "blend": (REGION_BLENDS, REGION_BLEND)}


def override(p: Any, field: str, value: Any) -> None:
    """An X/Y/Z axis value for this generation: applies to every concept, over the tags' own values."""
    overrides = dict(getattr(p, OVERRIDES, None) or {})
    overrides[field] = value
    setattr(p, OVERRIDES, overrides)


def _with_overrides(p: Any, applied: list[Applied], defaults: Defaults) -> tuple[list[Applied], Defaults]:
    """The X/Y/Z axes' values on every applied concept (an invalid one warns and is ignored)."""
    given = getattr(p, OVERRIDES, None) or {}
    gate, rest, ranges = {}, {}, {"beta": BETA_RANGE, "tau": TAU_RANGE}
    for field, value in given.items():
        if field in ranges and isinstance(value, (int, float)) and ranges[field][0] <= value <= ranges[field][1]:
            gate[field] = float(value)
        elif field == "lock" and value in LOCK_CHOICES:
            gate["lock"] = activation_lock(value)
        elif field == "projection" and value in PROJECTIONS:
            rest["projection"] = value
        elif field == "composition" and value in COMPOSITIONS:
            rest["composition"] = value
        elif field in SETTINGS_AXES:
            continue  # a setting, not an accordion default: read with it (_setting)
        else:
            warn(p, f"X/Y/Z plot: {field} {value!r} is out of range or unknown; the tags' and sliders' value is used")
    applied = [replace(a, activation=replace(a.activation, **gate)) for a in applied]
    if gate.get("lock") == "global":
        applied = [
            a
            if a.activation.concept.method == "perfusion"
            else replace(a, activation=replace(a.activation, lock="local"))
            for a in applied
        ]
    return applied, replace(defaults, **rest)


def _setting(p: Any, name: str) -> str:
    """A regional composition's setting (where the regions come from, how they are blended): the X/Y/Z axis's
    value, else the setting (a value neither can have warns, and the default is used)."""
    choices, default = SETTINGS_AXES[name]
    given = getattr(p, OVERRIDES, None) or {}
    if name in given:
        source, value = f"X/Y/Z plot: {name}", given[name]
    else:
        source, value = f"setting '{name}'", host.option(name)
    if value in choices:
        return value
    warn(p, f"{source} is {value!r}, not one of {', '.join(choices)}; using {default}")
    return default


def set_generation_defaults(p: Any, defaults: Defaults) -> None:
    setattr(p, GENERATION_DEFAULTS, defaults)


def generation_defaults(p: Any) -> Defaults:
    """The accordion's values for this generation; the settings' where the script did not run (API callers
    without alwayson_scripts run it too; a bare processing object does not)."""
    d = getattr(p, GENERATION_DEFAULTS, None)
    return d if isinstance(d, Defaults) else defaults_from_settings()


def defaults_from_settings() -> Defaults:
    return Defaults(
        True,
        float(host.option("beta")),
        float(host.option("tau")),
        str(host.option("lock")),
        str(host.option("projection")),
        str(host.option("composition")),
    )


def warn(p: Any, message: str) -> None:
    """A warning in the console and (unless the settings say console only) under the image."""
    log.warning(message)
    if host.option("warnings") == "UI and console" and hasattr(p, "comment"):
        p.comment(f"Perfusion: {message}")


def model_facts(model: Any, unet: Any) -> ModelFacts:
    """What concepts must fit in the loaded model (its cross-attention layers found once per U-Net: a cards
    page of many concepts asks for every card)."""
    if runtime.hooks is not None and runtime.hooks.model is unet:
        layers = runtime.hooks.layers
    else:
        if runtime.layers is None or runtime.layers[0] is not unet:
            runtime.layers = (unet, engine.find_cross_attention(unet))
        layers = runtime.layers[1]
    return ModelFacts(layers, embedding_width(model), host.clip_skip())


def embedding_width(model: Any) -> Optional[int]:
    """host.embedding_width, asked once per loaded model (it runs the text encoder: a cards page or an API
    listing must not run it once per concept, nor beside a generation)."""
    if runtime.width is None or runtime.width[0] is not model:
        runtime.width = (model, host.embedding_width(model))
    return runtime.width[1]


def problem_of(entry: Entry) -> Optional[str]:
    """Why the concept in `entry` cannot be used with the loaded model (file checks only while none is
    loaded); None when it can. What the cards and the API show before anyone generates."""
    try:
        concept = library().peek(entry)  # the header holds every shape the fit check reads
        model = host.sd_model()
        unet = host.diffusion_model(model)
        if unet is not None:
            check_fit(concept, model_facts(model, unet))
    except ConceptError as e:
        return str(e)
    except ValueError:  # a U-Net with several context widths: the generation's own check decides
        return None
    return None


def switch_off() -> None:
    """Every concept off, our embeddings unregistered (a user's own embedding of the same word is restored)."""
    composition.stop()
    if runtime.hooks is not None:
        runtime.hooks.clear()
    runtime.applied, runtime.key_contexts = [], None
    model = host.sd_model()
    for item in reversed(runtime.registered):
        if model is not None:
            try:
                host.restore_words(model, [item])
            except Exception as e:  # a DB rebuilt since: nothing of ours left in it
                log.warning(f"could not unregister the embedding of {item[1]!r}: {e}")
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


def _register_embedding(p: Any, model: Any, concept: Concept) -> None:
    added = host.register_word(
        model,
        concept.token,
        host.embedding_vector(concept.embedding, host.text_device(model)),
        host.embedding_size(concept.embedding),
        filename=f"perfusion:{concept.name}",
    )
    if not added:  # the word would be read as plain text: the concept's gate would hardly open
        warn(p, f"{concept.name}: this WebUI ({host.kind()}) has no textual-inversion database for its word's vectors")
    runtime.registered += added


def _apply_together(items: list[engine.Activation], projection: str) -> None:
    """The paper's way: every concept in the one edit of the hooks (with the pairs global locking reads)."""
    runtime.key_contexts = engine.KeyContexts() if any(i.lock == "global" for i in items) else None
    runtime.hooks.activate(engine.Activations(items, projection, runtime.key_contexts))


class PerfusionNetwork(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("perfusion")

    def activate(self, p: Any, params_list: list) -> None:
        switch_off()
        infotext.forget(p)
        self._apply(p, params_list)
        words = tuple((a.entry.name, a.activation.concept.token, a.entry.stamp) for a in runtime.applied)
        if words != runtime.words:  # the WebUI caches conds by prompt and tags, not by the words' embeddings
            host.clear_cond_caches(p)
            runtime.words = words

    def _apply(self, p: Any, params_list: list) -> None:
        defaults = generation_defaults(p)
        negatives = [n for n in (getattr(p, "negative_prompts", None) or []) if n and "<perfusion:" in n]
        if negatives:
            warn(p, "tags in the negative prompt are not applied (the WebUI reads tags from the prompt only)")
        if not params_list:
            return
        if not defaults.enabled:
            warn(p, "disabled in the Perfusion accordion; tags ignored")
            return
        model = host.sd_model()
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
        facts = ModelFacts(hooks.layers, embedding_width(model), host.clip_skip())
        applied, warnings = resolve(
            requests,
            library(),
            defaults,
            facts,
            list(getattr(p, "prompts", None) or []),
            lambda entry: host.card_preferences(entry.path),
        )
        for warning in warnings:
            warn(p, warning)
        if not applied:
            return
        applied, defaults = _with_overrides(p, applied, defaults)
        for a in applied:
            _register_embedding(p, model, a.activation.concept)
        runtime.applied = applied
        if defaults.composition == "regional" and len(applied) > 1:
            # each concept's own pass switches it on and pairs its own key contexts (composition.feed)
            regions, blend = _setting(p, "regions"), _setting(p, "blend")
            composition.start(hooks, [a.activation for a in applied], defaults.projection, regions, blend)
        else:
            _apply_together([a.activation for a in applied], defaults.projection)
        infotext.record(p, applied, defaults)

    def deactivate(self, p: Any) -> None:
        switch_off()


def unload() -> None:
    """Before "Reload UI" or the script's removal: hooks off the U-Net (the next activate re-attaches)."""
    switch_off()
    if runtime.hooks is not None:
        runtime.hooks.detach()
    runtime.hooks = None


def feed_global_lock(p: Any, cond: Any) -> None:
    """Global key-locking: encode the batch's prompts again with each globally locked concept's word
    replaced by its superclass, and pair every context tensor of `cond` with its twin (prompt schedules
    and AND sub-prompts line up one to one). Called right before each sampling pass."""
    contexts = runtime.key_contexts
    if contexts is None or host.sd_model() is None:
        return
    contexts.clear()
    prompts, steps, hires_steps = host.sampling_pass(p)
    locked = [a.activation.concept for a in runtime.applied if a.activation.lock == "global"]
    prompts = [as_superclass(text, locked) for text in prompts]
    twins = prompt_parser.get_multicond_learned_conditioning(
        host.sd_model(),
        prompt_parser.SdConditioning(prompts, width=p.width, height=p.height),
        steps,
        hires_steps,
        host.webui_option("use_old_scheduling", False),
    )
    originals, copies = list(host.cond_tensors(cond)), list(host.cond_tensors(twins))
    if len(originals) != len(copies) or any(o.shape != c.shape for o, c in zip(originals, copies)):
        warn(
            p,
            "global locking could not pair the prompt's conditioning with its superclass twin; "
            "using lock=local for this image",
        )
        runtime.applied = [replace(a, activation=replace(a.activation, lock="local")) for a in runtime.applied]
        runtime.key_contexts = None
        active = engine.Activations([a.activation for a in runtime.applied], runtime.hooks.activations.projection)
        runtime.hooks.activate(active)
        infotext.record(p, runtime.applied, generation_defaults(p))
        return
    for original, twin in zip(originals, copies):
        contexts.add(original, twin)


def feed_regional(p: Any, cond: Any) -> None:
    """Regional composition: register the sampling pass's conditioning (composition.feed). Where that fails the
    concepts are applied together for this image, with a warning, and the image still generates."""
    if runtime.regional is None:
        return
    try:
        composition.feed(p, cond)
    except Exception as e:  # an unforeseen prompt syntax or conditioning layout: never lose the image
        log.exception("regional composition could not read this prompt")
        warn(p, f"regional composition could not read this prompt ({e}); the concepts are applied together")
        items, projection = list(runtime.regional.items), runtime.regional.projection
        composition.stop()
        _apply_together(items, projection)
        if runtime.key_contexts is not None:
            feed_global_lock(p, cond)
        infotext.record(p, runtime.applied, replace(generation_defaults(p), composition="together"))


def check_regional(p: Any) -> None:
    """After a batch: say so when regional composition never found the prompt in the U-Net's batches."""
    if composition.missed():
        warn(
            p,
            "regional composition did not find this prompt's conditioning in the sampler's U-Net calls (another "
            "extension changes it?), so the concepts were not drawn; choose 'together' under Several concepts",
        )
