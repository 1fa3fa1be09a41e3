"""What the "Perfusion" training tab does, without its widgets: check a form, train, interrupt, resume.

The tab and the API call `check` (every problem at once, before any work) and `train` (through the
WebUI's job state: progress, ETA, loss text, live previews, Interrupt saves). Nothing is overwritten
unless the form says so; a concept that exists is resumed only when asked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from modules import devices

from ..adapter import encode_by_size
from ..concept import is_concept_file
from ..corpus import prompt_corpus
from ..covariance import NonFiniteEncodingError, adapter_encoder, cached_covariance
from ..dataset import DatasetError, load_dataset
from ..files import read_regular
from ..masks import fill_attention_masks
from ..options import ASPECTS, BETA, BETA_RANGE, LR_SCHEDULES, METHODS, TAU, TAU_RANGE, TRAIN_LOCKS
from ..report import overfitting_report
from ..train import (
    NonFiniteError,
    TrainConfig,
    Trainer,
    TrainError,
    captions_without_the_word,
    check_superclass,
    read_templates,
)
from . import host
from .adapter import adapter_for
from .board import Board

MASK_SOURCES = {"alpha": "alpha", "mask files": "files", "attention": "attention", "none": "none", "auto": "auto"}
EXISTING = ("ask", "overwrite", "resume")
MIN_FREE_BYTES = 200 * 2**20
NAME = re.compile(r"[\w][\w .-]{0,62}[\w-]|[\w]")  # used with fullmatch: no trailing newline, dot or space
# Names Windows reserves for devices (with any extension): a concept folder shared there could not hold them.
RESERVED = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.IGNORECASE)


def name_problem(name: str, what: str = "concept name") -> Optional[str]:
    """Why `name` cannot be a concept's file name and tag (None if it can)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        return (
            f"{what} {name!r}: use letters, digits, '_', '-', '.' or spaces, starting and ending with a letter "
            "or digit (no path separators or '..'); it becomes the file name and the tag"
        )
    if RESERVED.fullmatch(name):
        return f"{what} {name!r} is a device name on Windows (CON, NUL, COM1, ...): choose another"
    if not is_concept_file(f"{name}.safetensors"):
        return f"{what} {name!r} ends like a training checkpoint or cache file, which are not listed as concepts"
    return None


@dataclass
class TrainForm:
    """The tab's fields (also the API's JSON body and a preset file's content); defaults are the trainer's
    except where the WebUI wants its own (resolution, accumulation, save/preview cadence)."""

    name: str = ""
    token: str = ""
    superclass: str = ""
    folder: str = ""
    mask_source: str = "auto"
    aspect: str = "buckets"  # photos keep their aspect ratio (sizes of about resolution^2 px); square: centre-cropped
    templates_file: str = ""
    method: str = "perfusion"
    steps: int = TrainConfig.steps
    lr_values: float = TrainConfig.lr_values
    lr_embedding: float = TrainConfig.lr_embedding
    lr_schedule: str = TrainConfig.lr_schedule
    warmup_steps: int = TrainConfig.warmup_steps
    batch_size: int = 1  # the memory of one image per micro-step (8 GB cards)
    grad_accum: int = 16  # the paper's effective batch of 16 (4 x 4) at the memory of one image
    resolution: int = 512
    flip: bool = TrainConfig.flip
    train_beta: float = TrainConfig.train_beta
    train_tau: float = TrainConfig.train_tau
    lock: str = TrainConfig.lock
    save_every: int = 100
    preview_every: int = 100
    preview_prompt: str = ""
    preview_beta: float = BETA
    preview_tau: float = TAU
    existing: str = "ask"
    report_samples: int = 8  # images per set for the overfitting report after training (0: no report)
    gradient_checkpointing: bool = False  # less GPU memory (SD1.5 at 512 px in 8 GB), about 30 % slower

    @classmethod
    def from_dict(cls, data: Any) -> TrainForm:
        """A form from JSON (the API's body, a preset): every field's type and range checked, every problem
        reported at once (FormError.problems), nothing started."""
        if not isinstance(data, dict):
            raise FormError([f"the training request must be a JSON object of fields, got {type(data).__name__}"])
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - set(known))
        problems = [f"unknown training fields {unknown}; known: {sorted(known)}"] if unknown else []
        values = {}
        for name, value in data.items():
            if name in known:
                kind = type(getattr(cls, name))
                converted = _typed(value, kind)
                if converted is None:
                    problems.append(f"{name}: expected {_KIND_WORDS[kind]}, got {json.dumps(value)[:40]}")
                else:
                    values[name] = converted
        form = cls(**values)
        problems += [p for p in form_problems(form) if p.split(":")[0] not in {q.split(":")[0] for q in problems}]
        if problems:
            raise FormError(problems)
        return form


class FormError(TrainError):
    """Training fields of the wrong type or out of range; `problems` lists every one."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


_KIND_WORDS = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}
# (smallest, largest) of each numeric field: a mistyped 1e300 steps must not run for ever
RANGES = {
    "steps": (1, 100_000),
    "batch_size": (1, 64),
    "grad_accum": (1, 256),
    "resolution": (64, 4096),
    "save_every": (0, 100_000),
    "preview_every": (0, 100_000),
    "report_samples": (0, 256),
    "lr_values": (1e-7, 10.0),
    "lr_embedding": (1e-7, 10.0),
    "warmup_steps": (0, 100_000),
    "train_beta": BETA_RANGE,
    "train_tau": TAU_RANGE,
    "preview_beta": BETA_RANGE,
    "preview_tau": TAU_RANGE,
}


def _typed(value: Any, kind: type) -> Any:
    """value as `kind` when it is one (a whole float counts as an int, an int as a float), else None."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value)


def form_problems(form: TrainForm) -> list[str]:
    """Ranges of the numeric fields and the choice fields (the tab's widgets keep to them; JSON may not)."""
    problems = []
    for name, (low, high) in RANGES.items():
        value = getattr(form, name)
        if not isinstance(value, (int, float)) or not low <= value <= high:
            problems.append(f"{name}: {value!r} is outside {low:g}..{high:g}")
    return problems


def concept_path(form: TrainForm) -> Path:
    return host.concepts_folder() / f"{form.name}.safetensors"


def work_dir(form: TrainForm) -> Path:
    """Checkpoints, loss CSV and previews of a run (in the work folder beside the concepts folder)."""
    return host.work_folder() / "runs" / form.name


def check(form: TrainForm, load: bool = False) -> tuple[list[str], Optional[Any]]:
    """(problems, dataset): every problem the form has, before any work; the dataset when it loads. load: bring in
    the checkpoint chosen in the UI where the host loads one only for a job (`host.load_chosen_model`; only with
    the queue lock held); without it a checkpoint chosen and not loaded yet is no problem."""
    problems: list[str] = []
    bad_name = name_problem(form.name)
    if bad_name:
        problems.append(bad_name)
    if not form.token.strip() or len(form.token.split()) != 1:
        problems.append("token word: one word that will stand for the concept in prompts (e.g. 'hugsy')")
    if form.method not in METHODS:
        problems.append(f"method {form.method!r}: one of {', '.join(METHODS)}")
    if form.lr_schedule not in LR_SCHEDULES:
        problems.append(f"learning-rate schedule {form.lr_schedule!r}: one of {', '.join(LR_SCHEDULES)}")
    if form.lock not in TRAIN_LOCKS:
        problems.append(f"training key lock {form.lock!r}: one of {', '.join(TRAIN_LOCKS)}")
    if form.mask_source not in MASK_SOURCES:
        problems.append(f"mask source {form.mask_source!r}: one of {', '.join(MASK_SOURCES)}")
    if form.aspect not in ASPECTS:
        problems.append(f"aspect {form.aspect!r}: one of {', '.join(ASPECTS)}")
    if form.existing not in EXISTING:
        problems.append(f"existing concept {form.existing!r}: one of {', '.join(EXISTING)}")
    problems += form_problems(form)
    model = host.load_chosen_model() if load else host.sd_model()
    if host.diffusion_model(model) is None:
        if load or not host.model_chosen():  # else Forge loads the chosen one when the job starts, and checks then
            problems.append("no model is loaded: choose a Stable Diffusion checkpoint first")
    else:
        try:
            check_superclass(adapter_for(model), form.superclass)
        except (NotImplementedError, TrainError) as e:
            problems.append(str(e))
    templates: tuple[str, ...] = ()
    if form.templates_file:
        try:
            templates = read_templates(form.templates_file)
        except (OSError, TrainError) as e:
            problems.append(f"templates file: {e}")
    if not bad_name and concept_path(form).exists() and form.existing == "ask":
        problems.append(
            f"a concept named {form.name!r} exists ({concept_path(form)}): choose 'overwrite' "
            "(the old file is replaced only when training ends) or 'resume'"
        )
    folder = host.concepts_folder()
    probe = folder if folder.exists() else folder.parent
    if probe.exists() and shutil.disk_usage(probe).free < MIN_FREE_BYTES:
        problems.append(f"less than {MIN_FREE_BYTES // 2**20} MB free on the disk of {folder}")
    dataset = None
    try:
        mask = MASK_SOURCES.get(form.mask_source, "auto")
        dataset = load_dataset(
            form.folder,
            resolution=form.resolution,
            mask_source="auto" if mask == "attention" else mask,
            aspect=form.aspect if form.aspect in ASPECTS else "buckets",
        )
    except (DatasetError, ValueError) as e:
        problems.append(str(e))
    if dataset is not None:
        samples = dataset.samples
        missing = captions_without_the_word(templates, [s.caption for s in samples])
        lacking = [samples[i].path.with_suffix(".txt").name for i in missing]
        if lacking:
            problems.append(
                f"templates file {form.templates_file} has a line without [name], which takes the word from the "
                f"caption, but {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''} has no [name]: write "
                "[name] where the word goes in every caption, or give every template line [name]"
            )
    return problems, dataset


def planned_masks(form: TrainForm, dataset) -> list:
    """Per usable image, the mask training uses: its file or alpha mask [H, W], "attention" (the paper's zero-shot
    mask: the model's own cross-attention on the superclass word; auto falls back to it), or None (unmasked)."""
    if form.mask_source == "none":
        return [None] * len(dataset.samples)
    fallback = "attention" if form.mask_source in ("auto", "attention") else None
    return [s.mask if s.mask is not None and form.mask_source != "attention" else fallback for s in dataset.samples]


def mask_previews(form: TrainForm, dataset) -> list[tuple[str, str, Any]]:
    """(file name, where its mask comes from, PIL image with the masked-out part dimmed) per usable image, the
    masks exactly as training will use them (attention masks computed with the loaded model, same seed)."""
    from PIL import Image

    plan = planned_masks(form, dataset)
    masks = plan
    if any(isinstance(m, str) for m in plan):  # the trainer's latents (one batch per size) and seed
        adapter = adapter_for(host.sd_model(), int(form.resolution))
        with torch.no_grad(), host.vae_on(host.sd_model(), devices.device):
            latents = encode_by_size(adapter, [s.image for s in dataset.samples])
        masks = fill_attention_masks(adapter, latents, plan, form.superclass.strip(), seed=config(form).seed)
    out = []
    for sample, mask, planned in zip(dataset.samples, masks, plan):
        size = tuple(sample.image.shape[-2:])
        shown = torch.ones(1, 1, *size) if mask is None else F.interpolate(mask.float().cpu()[None, None], size)
        pixels = (sample.image.float().cpu() + 1) / 2 * (0.25 + 0.75 * shown[0, 0])  # outside the mask: dimmed
        picture = Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        if isinstance(planned, str):
            where = f"attention on {form.superclass.strip()!r}"
        else:
            where = "none (unmasked)" if planned is None else "mask file or alpha"
        out.append((sample.path.name, where, picture))
    return out


def config(form: TrainForm) -> TrainConfig:
    templates = read_templates(form.templates_file) if form.templates_file else TrainConfig.templates
    return TrainConfig(
        name=form.name,
        token=form.token.strip(),
        superclass=form.superclass.strip(),
        method=form.method,
        steps=int(form.steps),
        batch_size=int(form.batch_size),
        grad_accum=int(form.grad_accum),
        lr_values=float(form.lr_values),
        lr_embedding=float(form.lr_embedding),
        lr_schedule=form.lr_schedule,
        warmup_steps=int(form.warmup_steps),
        train_beta=float(form.train_beta),
        train_tau=float(form.train_tau),
        lock=form.lock,
        beta=float(form.preview_beta),
        tau=float(form.preview_tau),
        templates=templates,
        flip=bool(form.flip),
        save_every=int(form.save_every),
        preview_every=int(form.preview_every),
        gradient_checkpointing=bool(form.gradient_checkpointing),
        clip_skip=host.clip_skip(),
    )


def duration_words(seconds: float) -> str:
    """E.g. '40 s', '3 min', '1 h 5 min' (rounded up to what a person plans with)."""
    seconds = max(0, math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class CovarianceInterrupted(Exception):
    """Interrupt pressed while the covariance corpus is encoded (nothing saved yet)."""


@dataclass
class Status:
    """What the status route and the tab show."""

    state: str = "idle"  # idle / training / done / interrupted / failed
    name: str = ""
    step: int = 0
    total: int = 0
    loss: float = 0.0
    eta_s: float = 0.0
    message: str = ""
    concept: str = ""
    report: Optional[dict] = None  # the overfitting report (docs/overfitting-report.md)


status = Status()


def train(form: TrainForm, preview: Optional[Callable[[Any, int], Any]] = None) -> Status:
    """Check, then train through the WebUI's job state (the caller holds the queue lock). Returns the final
    status; problems found before training are in its message and nothing is written."""
    global status
    problems, dataset = check(form, load=True)
    if problems:
        status = Status("failed", form.name, message="\n".join(problems))
        return status
    try:
        return _train(form, dataset, preview)
    except BaseException as e:  # the status route must not say "training" forever (it would refuse every new run)
        status = Status("failed", form.name, message=f"training stopped: {type(e).__name__}: {e}")
        raise


def _train(form: TrainForm, dataset, preview) -> Status:
    global status
    adapter = adapter_for(host.sd_model(), int(form.resolution))
    cfg = config(form)
    state = host.job_state()
    status = Status("training", form.name, 0, cfg.steps, message="text-encoding covariance (once per model)")

    state.time_start = time.time()  # the WebUI's ETA is elapsed / progress: each phase times itself

    def covariance_progress(done: int, total: int) -> None:
        if state.interrupted:
            raise CovarianceInterrupted
        left = (
            f", about {duration_words((time.time() - state.time_start) * (total - done) / done)} left" if done else ""
        )
        status.message = f"text-encoding covariance (once per model and CLIP skip): {done}/{total} prompts{left}"
        state.textinfo = f"Perfusion: {status.message}"
        state.job_count, state.job_no = total, done

    try:
        cov = cached_covariance(
            host.work_folder() / "cache",
            adapter_encoder(adapter),
            prompt_corpus(int(host.option("covariance_prompts"))),
            encoder_hash=adapter.encoder_hash,
            clip_skip=cfg.clip_skip,
            progress=covariance_progress,
        )
    except NonFiniteEncodingError as e:
        status = Status("failed", form.name, message=f"{e}{_non_finite_hint('text encoder')}")
        return status
    except CovarianceInterrupted:
        status = Status(
            "interrupted",
            form.name,
            message="Interrupted while encoding the covariance corpus, before "
            "training; nothing was written (it starts over next time)",
        )
        return status
    state.job_count, state.job_no = cfg.steps, 0
    masks = planned_masks(form, dataset)
    images = [s.image for s in dataset.samples]
    captions = [s.caption for s in dataset.samples]
    trainer = Trainer(
        adapter, cov, cfg, images, masks, work_dir(form), concept_path(form), captions, int(form.resolution)
    )
    given, attention = (
        sum(torch.is_tensor(m) for m in masks),
        sum(m == "attention" for m in masks if isinstance(m, str)),
    )
    mask_note = f"masks: {given} from files or alpha, {attention} from the model's attention on {form.superclass!r}"
    status = Status("training", form.name, 0, cfg.steps, message=f"{dataset.summary()}; {mask_note}")
    started = time.monotonic()
    state.time_start = time.time()  # the ETA counts this run's training steps, not the covariance before them
    done_before: list[int] = []  # steps a resumed run found done: not part of this run's progress fraction

    board = Board.open(work_dir(form), cfg.train_beta, cfg.train_tau)
    if board is not None:
        preview = board.with_images(preview)

    def progress(p) -> None:
        if board is not None:
            board.step(p)
        status.step, status.total, status.loss, status.eta_s = p.step, p.total, p.smoothed, p.eta_s
        if not done_before:
            done_before.append(p.step - 1)
            state.job_count = p.total - done_before[0]
        state.job_no = p.step - done_before[0]
        state.textinfo = f"Perfusion {form.name}: step {p.step}/{p.total}, loss {p.smoothed:.4f}"

    offload = bool(host.webui_option("unload_models_when_training", False))  # the WebUI's Training option
    try:
        with host.vae_on(host.sd_model(), devices.cpu if offload else None):
            result = trainer.run(
                resume=form.existing == "resume",
                progress=progress,
                should_stop=lambda: bool(state.interrupted),
                preview=preview,
            )
    except NonFiniteError as e:
        status = Status("failed", form.name, status.step, cfg.steps, message=f"{e}{_non_finite_hint(e.where)}")
        return status
    finally:
        if board is not None:
            board.close()
    if not result.interrupted and form.report_samples > 0:
        state.textinfo = f"Perfusion {form.name}: overfitting report ({form.report_samples} images per set)"
        status.report = overfitting_report(
            adapter, result.concept, adapter.latent_shape(form.resolution), samples=int(form.report_samples)
        ).as_dict()
    status.state = "interrupted" if result.interrupted else "done"
    status.step, status.concept = result.step, str(result.path)
    status.message = (
        f"{'Interrupted at' if result.interrupted else 'Finished'} step {result.step} "
        f"in {time.monotonic() - started:.0f} s; saved {result.path}"
    )
    state.textinfo = f"Perfusion {form.name}: {status.message}"  # the progress line ends on the outcome
    return status


def _non_finite_hint(where: str) -> str:
    """What to change in the WebUI for a NaN met while training, in the text encoder or the loss
    (NonFiniteError.where)."""
    if where == "text encoder" and host.webui_option("emphasis", "Original") == "Original":
        return (
            ". The WebUI's emphasis mode 'Original' divides the encoding by its own mean, which is 0/0 when "
            "the text encoder's last layer norm has no bias (random or converted checkpoints): set Settings > "
            "Stable Diffusion > Emphasis mode to 'No norm' and train again"
        )
    return ". Try fp32 (--no-half) or a lower learning rate; the concept on disk is the last finite step"


def save_preset(form: TrainForm, name: str) -> Path:
    """The form as JSON in <work folder>/presets/NAME.json (atomically)."""
    from ..files import atomic_write

    problem = name_problem(name, "preset name")
    if problem:
        raise TrainError(problem)
    return atomic_write(host.work_folder() / "presets" / f"{name}.json", json.dumps(asdict(form), indent=2).encode())


def load_preset(name: str) -> TrainForm:
    path = host.work_folder() / "presets" / f"{name}.json"
    try:
        return TrainForm.from_dict(json.loads(read_regular(path, 2**20).decode("utf-8")))
    except (OSError, ValueError, TypeError) as e:  # FormError is a ValueError: its text lists the problems
        raise TrainError(f"preset {path}: {e}") from None
