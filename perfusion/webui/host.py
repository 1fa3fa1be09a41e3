"""What the extension needs from the running WebUI, in one place: AUTOMATIC1111 v1.10.x, reForge, Forge and
Forge Neo. Which one runs is told once (`kind()`, from its packages, before any model loads); every function
below that differs between them asks it.

| kind | U-Net | textual-inversion vectors | training through |
|---|---|---|---|
| a1111 | `sd_model.model.diffusion_model` (ldm/sgm) | `sd_hijack.model_hijack.embedding_db` | WebUIAdapter |
| reforge | the same object as `forge_objects.unet.model.diffusion_model` (ldm_patched) | A1111's database | WebUIAdapter |
| forge, neo | `forge_objects.unet.model.diffusion_model` (backend/) | each text engine's `.embeddings` | BackendAdapter |

Every function takes the WebUI's own objects; `modules` is imported lazily so this module can be
imported (and its pure helpers tested) without the WebUI.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional

import torch

OPTION_PREFIX = "perfusion_"
HostKind = Literal["a1111", "reforge", "forge", "neo"]


@functools.cache
def kind() -> HostKind:
    """Which WebUI this is. A1111 has no `modules_forge`; Forge Neo says "neo" in modules_forge.forge_version;
    lllyasviel's Forge has the `backend` package; reForge has modules_forge over A1111's conditioning and an
    ldm_patched U-Net, and no `backend`."""
    if importlib.util.find_spec("modules_forge") is None:
        return "a1111"
    try:
        from modules_forge import forge_version

        version = str(getattr(forge_version, "version", ""))
    except Exception:  # an older Forge without the module
        version = ""
    if version == "neo":
        return "neo"
    return "forge" if importlib.util.find_spec("backend") is not None else "reforge"


def forge_backend() -> bool:
    """The U-Net and text engines are Forge's `backend` (Forge, Neo), not A1111's (A1111, reForge)."""
    return kind() in ("forge", "neo")


def diffusion_model(sd_model: Any) -> Optional[torch.nn.Module]:
    """The U-Net whose attn2 layers get the hooks, or None when the WebUI has no model (yet)."""
    if sd_model is None:
        return None
    if forge_backend() and hasattr(sd_model, "forge_objects"):
        return sd_model.forge_objects.unet.model.diffusion_model
    inner = getattr(sd_model, "model", None)  # reForge: the same module as forge_objects' U-Net
    return getattr(inner, "diffusion_model", None)


def concepts_folder() -> Path:
    """The concepts folder: the setting, else --perfusion-dir, else <models>/perfusion."""
    from modules import paths, shared

    default = Path(paths.models_path) / "perfusion"
    for chosen in (shared.opts.data.get(OPTION_PREFIX + "dir"), getattr(shared.cmd_opts, "perfusion_dir", None)):
        if isinstance(chosen, str) and chosen.strip() and "\0" not in chosen:  # a NUL byte is no path anywhere
            return Path(chosen.strip())
    return default


# Working data that earlier versions kept inside the concepts folder, where the WebUI showed each
# hidden folder as a button above the cards: moved to the work folder on first use.
_LEGACY_WORK = {".training": "runs", ".cache": "cache", ".presets": "presets"}


def work_folder() -> Path:
    """Training runs (`runs/NAME`), the covariance cache (`cache`) and presets (`presets`): a sibling
    of the concepts folder (`models/perfusion-training`), never shown as cards or folders."""
    import shutil

    concepts = concepts_folder()
    work = concepts.parent / f"{concepts.name or 'perfusion'}-training"
    for old, new in _LEGACY_WORK.items():
        if (concepts / old).is_dir() and not (work / new).exists():
            work.mkdir(parents=True, exist_ok=True)
            shutil.move(str(concepts / old), str(work / new))
    return work


def option(key: str) -> Any:
    from modules import shared

    return getattr(shared.opts, OPTION_PREFIX + key)


def sd_model() -> Any:
    """The loaded model (None while the WebUI has none)."""
    from modules import shared

    return shared.sd_model


def load_chosen_model() -> Any:
    """The model to train on: `sd_model()`, on Forge's backend first (re)loaded from the checkpoint chosen in the UI,
    as a generation does before it runs (Forge and Neo load a checkpoint only when a job needs it, so after a start
    there is none until the first image). Call it with the WebUI's queue lock held. None when none can be loaded."""
    if forge_backend():
        from modules import sd_models

        reload = getattr(sd_models, "forge_model_reload", None)
        if reload is not None:
            try:
                reload()
            except ValueError:  # Forge's "Failed to find available model...": no checkpoint chosen or found
                pass
    return sd_model()


def model_chosen() -> bool:
    """Whether a model is loaded or, on Forge's backend, a checkpoint is chosen that a job will load."""
    if diffusion_model(sd_model()) is not None:
        return True
    if not forge_backend():
        return False
    from modules import sd_models

    chosen = getattr(getattr(sd_models, "model_data", None), "forge_loading_parameters", None) or {}
    return chosen.get("checkpoint_info") is not None


def job_state() -> Any:
    """The WebUI's job state: progress text, interrupt flag, live preview."""
    from modules import shared

    return shared.state


def webui_option(name: str, default: Any = None) -> Any:
    """One of the WebUI's own settings (default when this WebUI version has no such setting)."""
    from modules import shared

    return getattr(shared.opts, name, default)


def api_auth() -> str:
    """--api-auth ("user:pass,user2:pass2"), empty when the API is open."""
    from modules import shared

    return shared.cmd_opts.api_auth or ""


def clip_skip() -> int:
    """The CLIP skip generations and training use now (Settings > Stable Diffusion > Clip skip)."""
    from modules import shared

    return int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)


_preferences: dict[str, tuple[Optional[int], dict[str, float]]] = {}  # json path -> (its mtime, values)


def file_sha256(path: Path, name: str, compute: bool = True) -> str:
    """A concept file's sha256 by the WebUI's own machinery (cached in its cache.json under
    "perfusion/NAME", as Lora and textual inversion cache theirs); with compute False only from that cache;
    empty where the host has none (or, without compute, has not hashed the file)."""
    try:
        from modules import hashes
    except ImportError:
        return ""
    if not compute:
        return hashes.sha256_from_cache(str(path), f"perfusion/{name}") or ""
    return hashes.sha256(str(path), f"perfusion/{name}") or ""


def card_preferences(path: Path) -> dict[str, float]:
    """Preferred tau/beta from a card's user metadata (`NAME.json` beside the file), numbers only; read again
    only when that file changes."""
    from modules import extra_networks

    json_path = str(Path(path).with_suffix(".json"))
    try:
        stamp = os.stat(json_path).st_mtime_ns
    except OSError:
        stamp = None
    cached = _preferences.get(json_path)
    if cached is not None and cached[0] == stamp:
        return dict(cached[1])
    meta = extra_networks.get_user_metadata(str(path))
    out = {}
    for key in ("tau", "beta"):
        try:
            out[key] = float(meta[f"preferred_{key}"])
        except (KeyError, TypeError, ValueError):
            pass
    _preferences[json_path] = (stamp, out)
    return dict(out)


def text_engines(sd_model: Any) -> list[Any]:
    """Forge's text-processing engines (each with its own `.embeddings` database)."""
    return [
        getattr(sd_model, n)
        for n in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")
        if hasattr(sd_model, n)
    ]


def embedding_databases(sd_model: Any) -> list[Any]:
    """Where textual-inversion vectors are looked up: the hijack's DB (A1111, reForge) or each Forge engine's."""
    if forge_backend():
        return [e.embeddings for e in text_engines(sd_model) if hasattr(e, "embeddings")]
    from modules import sd_hijack

    return [sd_hijack.model_hijack.embedding_db]


def register_embedding(db: Any, embedding: Any, name: str, sd_model: Any) -> None:
    """Register (or, with embedding None, remove) `name` in a textual-inversion database: A1111's
    register_embedding_by_name(embedding, model, name) or Forge's (embedding, name)."""
    if "model" in inspect.signature(db.register_embedding_by_name).parameters:
        db.register_embedding_by_name(embedding, sd_model, name)
    else:
        db.register_embedding_by_name(embedding, name)


def register_word(sd_model: Any, word: str, vec: Any, size: tuple[int, int], filename: str = "") -> list[tuple]:
    """`vec` as the textual-inversion vectors of `word` in every embedding database of the model (size:
    (vectors, shape) as embedding_size gives). Returns [(db, word, the embedding it replaced)] for
    restore_words."""
    databases = embedding_databases(sd_model)
    if not databases:
        return []
    if forge_backend():  # its text engines' own class (Neo also keeps an unconnected A1111 one)
        from backend.text_processing.textual_inversion import Embedding
    else:
        from modules.textual_inversion.textual_inversion import Embedding
    replaced = []
    for db in databases:
        item = Embedding(vec, word)
        item.vectors, item.shape = size
        item.filename = filename
        replaced.append((db, word, db.word_embeddings.get(word)))
        register_embedding(db, item, word, sd_model)
    return replaced


def restore_words(sd_model: Any, replaced: list[tuple]) -> None:
    """Undo register_word: each word gets back what it had (nothing, or a user's own embedding)."""
    for db, word, previous in reversed(replaced):
        register_embedding(db, previous, word, sd_model)


def embedding_vector(concept_embedding: dict[str, torch.Tensor], device: Any = "cpu") -> Any:
    """The WebUI's Embedding.vec for a concept's embedding, float32 on `device` (the WebUI concatenates it
    with the token embeddings as is): a tensor [n, d] for one text encoder, SDXL's dict {"clip_l", "clip_g"}."""
    vec = {k: v.detach().to(device, torch.float32) for k, v in concept_embedding.items()}
    return vec[""] if set(vec) == {""} else vec


def embedding_size(concept_embedding: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(Embedding.vectors, Embedding.shape) as the WebUI sets them when it loads an embedding file: the
    number of tokens the word becomes, and the width (SDXL: clip_l + clip_g widths)."""
    first = next(iter(concept_embedding.values()))
    return int(first.shape[0]), sum(int(v.shape[-1]) for v in concept_embedding.values())


def embedding_width(sd_model: Any) -> Optional[int]:
    """The width a textual-inversion vector must have for this model's text encoder(s) (SDXL: clip_l +
    clip_g), found as the WebUI finds it (the encoding of one token; Forge: what its engines' databases expect);
    None where the host does not say."""
    if forge_backend():
        shapes = {
            getattr(e.embeddings, "expected_shape", None) for e in text_engines(sd_model) if hasattr(e, "embeddings")
        }
        return int(shapes.pop()) if len(shapes) == 1 and isinstance(next(iter(shapes)), int) else None
    encoder = getattr(sd_model, "cond_stage_model", None)
    if encoder is None or not hasattr(encoder, "encode_embedding_init_text"):
        return None
    try:
        with torch.no_grad():
            return int(encoder.encode_embedding_init_text(",", 1).shape[-1])
    except Exception:  # a host whose encoder answers differently (Forge's engines): no check rather than no image
        return None


def text_device(sd_model: Any) -> Any:
    """Where the WebUI keeps textual-inversion vectors (devices.device; Forge moves them itself)."""
    if forge_backend():
        return "cpu"
    from modules import devices

    return devices.device


@contextmanager
def vae_on(sd_model: Any, device: Any) -> Iterator[None]:
    """The VAE (first_stage_model) on `device` inside, back where it was after. Training with the WebUI's
    "Move VAE and CLIP to RAM when training" keeps it in RAM once the latents are cached (the text
    encoder stays: the embedding's gradient passes through it) and brings it back for previews."""
    vae = getattr(sd_model, "first_stage_model", None)
    params = next(vae.parameters(), None) if vae is not None else None
    if params is None or device is None:
        yield
        return
    was = params.device
    vae.to(device)
    try:
        yield
    finally:
        vae.to(was)


@contextmanager
def text_engine_notes_kept() -> Iterator[None]:
    """Forge's and Neo's text engine notes every embedding word it encodes in a module-level record that the
    image's infotext reads ("TI"): an encoding of the extension's own (a concept's clause, a training prompt) leaves
    it as it found it. Nothing to keep on A1111 and reForge."""
    try:
        from backend.text_processing import classic_engine
    except ImportError:
        classic_engine = None
    notes = getattr(classic_engine, "last_extra_generation_params", None)
    if not isinstance(notes, dict):
        yield
        return
    record = dict(notes)
    try:
        yield
    finally:
        classic_engine.last_extra_generation_params.clear()
        classic_engine.last_extra_generation_params.update(record)


def clear_cond_caches(p: Any) -> None:
    """Forget the conditioning the WebUI cached for unchanged prompts (the lists are shared by all jobs:
    A1111 keeps [key, cond], Forge Neo [key, cond, extra])."""
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        cache = getattr(p, name, None)
        if isinstance(cache, list) and len(cache) >= 2:
            cache[:] = [None] * len(cache)


def sampling_pass(p: Any) -> tuple[list[str], int, Optional[int]]:
    """(prompts, steps, hires steps) of the sampling pass about to run, as the WebUI reads prompt schedules for it:
    the first pass's, or on the hires fix's pass its own prompts and its steps."""
    if not getattr(p, "is_hr_pass", False):
        return list(p.prompts or []), getattr(p, "firstpass_steps", None) or p.steps, None
    hires_steps = (getattr(p, "hr_second_pass_steps", 0) or p.steps) * getattr(p, "step_multiplier", 1)
    return list(p.hr_prompts or []), getattr(p, "firstpass_steps", None) or p.steps, hires_steps


def cond_tensors(cond: Any) -> Iterator[torch.Tensor]:
    """The cross-attention context tensors inside a WebUI conditioning, in a fixed order.

    Handles a plain tensor, SDXL's dict ("crossattn"), prompt_parser's MulticondLearnedConditioning
    (.batch), ComposableScheduledPromptConditioning (.schedules), ScheduledPromptConditioning (.cond),
    and lists of these."""
    if isinstance(cond, torch.Tensor):
        yield cond
    elif isinstance(cond, dict):
        if "crossattn" in cond:
            yield from cond_tensors(cond["crossattn"])
    elif isinstance(cond, (list, tuple)):
        for c in cond:
            yield from cond_tensors(c)
    else:
        for attr in ("batch", "schedules", "cond"):
            if hasattr(cond, attr):
                yield from cond_tensors(getattr(cond, attr))
                return
