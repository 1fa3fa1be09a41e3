"""The node classes ComfyUI registers (NODE_CLASS_MAPPINGS): load a concept onto MODEL + CLIP, read its card.

ComfyUI's conventions: a node's problem is an exception whose message names the file (ComfyUI fails that
prompt only and shows the message); combos list the files of the `perfusion` model folder.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..concept import Concept, ConceptError, is_concept_file, load_concept
from ..hooks import Activation, KeyContexts
from ..options import (
    BETA_RANGE,
    COMPOSITION,
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
from . import patch, text

FOLDER = "perfusion"  # folder_paths name; ComfyUI/models/perfusion by default
MAX_PAIRS = 64  # prompt encodings kept with their twins (global locking, regional composition): recent workflows
log = logging.getLogger("perfusion")


def register_folder() -> None:
    """Register `models/perfusion` with folder_paths (idempotent; keeps paths extra_model_paths.yaml added)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    folder_paths.folder_names_and_paths[FOLDER] = ([default] + [p for p in paths if p != default], {".safetensors"})


def concept_names() -> list[str]:
    import folder_paths

    register_folder()
    return [n for n in folder_paths.get_filename_list(FOLDER) if is_concept_file(os.path.basename(n))]


def concept_path(name: str) -> str:
    import folder_paths

    register_folder()
    return folder_paths.get_full_path_or_raise(FOLDER, name)


class _Reader:
    """Parses a concept file once per version of it (its mtime and size)."""

    def __init__(self):
        self._last: tuple[str, tuple[int, int], Concept] | None = None

    def read(self, name: str) -> tuple[str, Concept]:
        path = concept_path(name)
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        if self._last is None or self._last[:2] != (path, stamp):
            self._last = (path, stamp, load_concept(path))  # ConceptError names the file
        return path, self._last[2]


def _stamp(concept_name: str) -> str:
    try:
        st = os.stat(concept_path(concept_name))
    except Exception as e:  # ComfyUI calls this before validating the name; the loader then says what is wrong
        return f"missing: {e}"
    return f"{st.st_mtime_ns}:{st.st_size}"


class PerfusionConceptLoader:
    """MODEL + CLIP with one more Perfusion concept: the U-Net's cross-attention applies the gated rank-1 edit,
    the CLIP reads the concept's word as its learned vectors. Chained loaders share one edit."""

    DESCRIPTION = (
        "Applies a Perfusion concept (a ~35 KB personalization trained in the WebUI's Perfusion tab): write its "
        "word in the prompt. Chain several for several concepts. beta/tau 0 use the concept's suggested gate."
    )
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model whose cross-attention applies the concept.", "The CLIP that knows its word.")
    FUNCTION = "load"

    def __init__(self):
        self.reader = _Reader()

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the concept is applied to."}),
                "clip": ("CLIP", {"tooltip": "The CLIP model that learns the concept's word."}),
                "concept_name": (concept_names(), {"tooltip": "A concept file in models/perfusion."}),
                "tau": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": TAU_RANGE[1],
                        "step": 0.01,
                        "tooltip": "Gate temperature (softness). 0: the concept's suggested value.",
                    },
                ),
                "beta": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": BETA_RANGE[0],
                        "max": BETA_RANGE[1],
                        "step": 0.01,
                        "tooltip": "Gate threshold: higher follows the prompt more, lower keeps more likeness. "
                        "0: the concept's suggested value.",
                    },
                ),
            },
            "optional": {
                "lock": (
                    list(LOCK_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "Key-locking: auto (as the concept was trained), local (the paper's), global (keys "
                        "read the prompt with the superclass; use this loader's CLIP to encode) or hard.",
                    },
                ),
                "projection": (
                    list(PROJECTIONS),
                    {"default": "approximate", "tooltip": "How the concepts of a chain share one edit (together)."},
                ),
                "composition": (
                    list(COMPOSITIONS),
                    {
                        "default": COMPOSITION,
                        "tooltip": "Two or more concepts in a chain: regional draws each from its own clause of the "
                        "prompt (split at commas and 'and') where the model puts its superclass word; together is "
                        "the paper's one edit. The last loader's choice holds for the chain; encode with its CLIP.",
                    },
                ),
                "regions": (
                    list(REGION_SOURCES),
                    {
                        "default": REGION_SOURCE,
                        "tooltip": "Regional: places takes each concept's region from the place its clause names "
                        "('at the left', 'in the top right corner') when every concept names its own; attention "
                        "always from where the model puts the superclass word.",
                    },
                ),
                "blend": (
                    list(REGION_BLENDS),
                    {
                        "default": REGION_BLEND,
                        "tooltip": "Regional: prediction runs a pass per concept and blends the predictions (keeps "
                        "each look best); attention draws the image in one pass (faster), every cross-attention "
                        "reading each concept's own clause inside its region; auto takes attention where the "
                        "regions come from named places.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, concept_name: str, **_) -> str:
        return _stamp(concept_name)

    def load(
        self,
        model,
        clip,
        concept_name: str,
        tau: float,
        beta: float,
        lock: str = "auto",
        projection: str = "approximate",
        composition: str = COMPOSITION,
        regions: str = REGION_SOURCE,
        blend: str = REGION_BLEND,
    ):
        path, concept = self.reader.read(concept_name)
        if (
            lock not in LOCK_CHOICES
            or projection not in PROJECTIONS
            or composition not in COMPOSITIONS
            or regions not in REGION_SOURCES
            or blend not in REGION_BLENDS
        ):
            raise ValueError(
                f"{concept_name}: lock must be one of {LOCK_CHOICES}, projection one of {PROJECTIONS}, "
                f"composition one of {COMPOSITIONS}, regions one of {REGION_SOURCES} and blend one of {REGION_BLENDS}"
            )
        for other in patch.applied(model):
            if other.concept.token.lower() == concept.token.lower() and other.concept.name != concept.name:
                raise ValueError(
                    f"{path}: its word {concept.token!r} is already the word of {other.concept.name}, loaded earlier "
                    "in this chain; use one of them, or retrain one with another word"
                )
        activation = Activation(concept, beta=beta or None, tau=tau or None, lock=activation_lock(lock))
        lock = activation.lock  # auto: the concept's own
        contexts = patch.key_contexts(model)
        if contexts is None and any(a.lock == "global" for a in [*patch.applied(model), activation]):
            contexts = KeyContexts(limit=MAX_PAIRS)  # also after a composed chain, which pairs nothing
        words = frozenset({concept.token.lower()} if lock == "global" else ())
        try:
            patched = patch.with_concepts(
                model, [activation], projection, contexts, composition, MAX_PAIRS, regions, blend
            )
            taught = text.with_words(clip, [concept], words, contexts, patch.composition(patched))
        except ConceptError as e:
            raise type(e)(f"{path}: {e}") from None
        skip = 1 if clip.layer_idx is None else -int(clip.layer_idx)
        if concept.arch in ("sd1", "other") and concept.clip_skip != skip:
            log.warning(
                "Perfusion: %s was trained with CLIP skip %d, this CLIP stops at skip %d (CLIPSetLastLayer); "
                "its gate may open less",
                concept_name,
                concept.clip_skip,
                skip,
            )
        return (patched, taught)


class PerfusionConceptInfo:
    """A concept's card: its word, superclass, base model and suggested gate."""

    DESCRIPTION = "Shows a Perfusion concept's metadata (word, superclass, base model, suggested gate)."
    CATEGORY = "loaders"
    RETURN_TYPES = ("STRING", "STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("info", "word", "beta", "tau")
    FUNCTION = "info"
    OUTPUT_NODE = True

    def __init__(self):
        self.reader = _Reader()

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"concept_name": (concept_names(), {"tooltip": "A concept file in models/perfusion."})}}

    @classmethod
    def IS_CHANGED(cls, concept_name: str, **_) -> str:
        return _stamp(concept_name)

    def info(self, concept_name: str):
        _, c = self.reader.read(concept_name)
        lines = [
            f"word: {c.token} (superclass: {c.superclass})",
            f"method: {c.method}, base model: {c.arch}" + (f" {c.base_model_hash[:10]}" if c.base_model_hash else ""),
            f"suggested gate: beta {c.beta:g}, tau {c.tau:g} (trained at beta {c.train_beta:g}, tau {c.train_tau:g})",
            f"trained {c.steps} steps, CLIP skip {c.clip_skip}, {len(c.values)} cross-attention layers"
            + (f", created {c.created}" if c.created else ""),
        ]
        summary = "\n".join(lines)
        return {"ui": {"text": [summary]}, "result": (summary, c.token, float(c.beta), float(c.tau))}


NODE_CLASS_MAPPINGS = {"PerfusionConceptLoader": PerfusionConceptLoader, "PerfusionConceptInfo": PerfusionConceptInfo}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PerfusionConceptLoader": "Load Perfusion Concept",
    "PerfusionConceptInfo": "Perfusion Concept Info",
}
