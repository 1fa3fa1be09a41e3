"""Training images: the folder of 1-10 photos a user dropped, read into clean tensors.

Next to an image `dog.png` the loader also reads `dog.txt` (its caption, for [filewords]) and
`dog.mask.png`, `dog_mask.png` or `dog-mask.png` (white = object). Files it cannot use are listed
with a reason instead of failing the whole run. The folder is only read, never written, and every
list comes out sorted by file name so runs are reproducible. Names starting with "." are ignored.

Photos keep their aspect ratio: each goes to the bucket (a training size of about resolution^2 pixels) whose
shape is nearest its own and loses only the sliver that does not fit, so a portrait keeps its subject's
head and feet; `aspect="square"` centre-crops to a square instead.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import is_regular, read_regular
from .options import ASPECTS, BUCKET_MULTIPLE, MASK_SOURCES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIXES = (".mask.png", "_mask.png", "-mask.png")
CAPTION_SUFFIX = ".txt"
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey ("I" is how Pillow < 10 opens it)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_FORMATS = "png, jpg or webp"
MAX_IMAGES = 200  # Perfusion learns from 1-10 photos; a folder of thousands is a mistake, not a data set
MAX_PIXELS = 64 * 2**20  # per image or mask (a 8192 x 8192 photo): larger ones are refused before decoding
MAX_CAPTION_BYTES = 64 * 2**10
LISTED = 5  # skipped files named in a message; the rest are counted (a wrong folder is not echoed back)


class DatasetError(ValueError):
    """Nothing usable: the message names the folder and what to do."""


@dataclass
class Skipped:
    """A file left out, with a one-line reason for the user."""

    path: Path
    reason: str


@dataclass
class Sample:
    """One training image.

    image: [3, H, W] float32 in [-1, 1], RGB, centre-cropped to its bucket's aspect ratio and resized to it
        (LANCZOS); [3, R, R] with aspect="square".
    mask: [H, W] float32 in [0, 1], 1 = object (from the alpha channel or a mask file), or None.
    caption: the stripped text of `<stem>.txt`, "" when there is none.
    """

    path: Path
    image: torch.Tensor
    mask: torch.Tensor | None
    caption: str


@dataclass
class Dataset:
    """The usable samples and the skipped files, both in file-name order."""

    samples: list[Sample]
    skipped: list[Skipped]

    def summary(self) -> str:
        """E.g. '5 usable images (3 at 512x512, 2 at 384x640), 2 skipped:' then one indented 'name: reason'
        line per skipped file; the sizes (width x height) only when there is more than one."""
        n = len(self.samples)
        head = f"{n} usable image{'' if n == 1 else 's'}"
        sizes = by_size([s.image for s in self.samples])
        if len(sizes) > 1:
            head += f" ({', '.join(f'{len(idx)} at {w}x{h}' for (h, w), idx in sizes.items())})"
        return f"{head}, {len(self.skipped)} skipped:\n{_reasons(self.skipped)}" if self.skipped else head


class _Skip(Exception):
    """Raised while reading one file; the message is the reason shown to the user."""


def scan_folder(folder: str | Path) -> tuple[list[Path], list[Skipped]]:
    """Cheap pre-check for UIs (decodes nothing): candidate images and files skipped by their name.

    Captions and mask files that belong to an image are neither. Raises DatasetError when the
    folder is missing or is not a folder.
    """
    images, skipped, _ = _scan(Path(folder))
    return images, skipped


def load_dataset(
    folder: str | Path,
    resolution: int = 512,
    min_size: int = 64,
    mask_source: str = "auto",
    aspect: str = "buckets",
    multiple: int = BUCKET_MULTIPLE,
) -> Dataset:
    """Read every image of `folder` into a Sample of about `resolution`^2 px; skip what cannot be used.

    min_size: images whose short side (px) is smaller are skipped.
    mask_source: 'alpha' (the image's alpha channel), 'files' (a companion mask file), 'auto'
    (alpha if the image has a non-trivial one, else a companion file, else None) or 'none'.
    aspect: 'buckets' (each image at the size of `buckets(resolution, multiple)` nearest its aspect ratio)
    or 'square' (resolution x resolution).
    Raises DatasetError if the folder is missing, empty, or nothing in it is usable.
    """
    _check_options(resolution, min_size, mask_source)
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    sizes = buckets(resolution, multiple) if aspect == "buckets" else [(resolution, resolution)]
    folder = Path(folder)
    images, skipped, names = _scan(folder)
    if not images and not skipped:
        raise DatasetError(f"dataset folder {folder} is empty: add 1-10 photos of the concept ({_FORMATS})")
    if len(images) > MAX_IMAGES:
        raise DatasetError(
            f"dataset folder {folder} holds {len(images)} images: Perfusion learns from 1-10 "
            f"photos of one concept; choose a folder with at most {MAX_IMAGES}"
        )
    samples, seen = [], {}
    for path in images:
        try:
            samples.append(_load_sample(path, names, seen, sizes, min_size, mask_source))
        except _Skip as skip:
            skipped.append(Skipped(path, str(skip)))
    skipped.sort(key=lambda s: s.path.name)
    if not samples:
        raise DatasetError(
            f"no usable images in {folder}:\n{_reasons(skipped)}\n"
            f"Add 1-10 photos ({_FORMATS}), at least {min_size} px on the short side."
        )
    return Dataset(samples, skipped)


def buckets(resolution: int, multiple: int = BUCKET_MULTIPLE) -> list[tuple[int, int]]:
    """Training sizes (width, height) in px: resolution x resolution, and for each width below it that is a
    multiple of `multiple` the tallest portrait whose height is such a multiple too, with an area within
    resolution^2 and both sides at least resolution / 2; and each portrait turned on its side. At 512 px:
    256x1024, 320x768, 384x640, 448x576, 512x512 and 576x448 ... 1024x256."""
    if resolution < 1 or multiple < 1:
        raise ValueError(f"resolution and multiple must be >= 1 px, got {resolution} and {multiple}")
    sizes = {(resolution, resolution)}
    for width in range(multiple, resolution, multiple):
        height = resolution * resolution // width // multiple * multiple
        if height > width >= resolution / 2:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size (width, height) of `sizes` whose aspect ratio is nearest width / height (on a log scale, so
    2:1 and 1:2 are equally far from square); of equally near ones the largest."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def by_size(images: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of `images` ([..., H, W] each) grouped by (H, W), groups in order of first appearance: one
    batch per group, since a batch holds images of one size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    return groups


def soft_mask(mask: torch.Tensor, size: int | tuple[int, int], blur: float = 0.05) -> torch.Tensor:
    """Loss weights [h, w] float32 from a mask [H, W] in [0, 1], for a latent grid of `size` (h, w).

    Area-interpolated to the grid, gaussian-blurred with sigma = `blur` x the grid side (per axis),
    then divided by its mean so the weights average 1 and keep the loss scale. An all-zero mask
    gives all ones.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    if blur < 0:
        raise ValueError(f"blur must be >= 0, got {blur}")
    h, w = (size, size) if isinstance(size, int) else size
    m = F.interpolate(mask.detach().float()[None, None], size=(h, w), mode="area")
    m = _blur_axis(_blur_axis(m, blur * h, dim=2), blur * w, dim=3)[0, 0].clamp(min=0)
    mean = m.mean()
    return m / mean if mean > 1e-6 else torch.ones_like(m)


def _check_options(resolution: int, min_size: int, mask_source: str) -> None:
    if resolution < 1 or min_size < 1:
        raise ValueError(f"resolution and min_size must be >= 1 px, got {resolution} and {min_size}")
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {', '.join(MASK_SOURCES)}, got {mask_source!r}")


def _scan(folder: Path) -> tuple[list[Path], list[Skipped], set[str]]:
    """Candidate images, files skipped by name, and every file name in the folder."""
    files = _listing(folder)
    names = {p.name for p in files}
    stems = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    images, skipped = [], []
    for path in files:
        if path.is_dir():
            skipped.append(Skipped(path, "folder (subfolders are not read)"))
        elif not is_regular(path):
            skipped.append(Skipped(path, "not a regular file (a pipe, device or broken link)"))
        elif _is_companion(path.name, stems):
            continue
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped.append(Skipped(path, _not_image(path)))
    return images, skipped, names


def _listing(folder: Path) -> list[Path]:
    """The folder's entries sorted by name, hidden ones left out."""
    if not folder.exists():
        raise DatasetError(f"dataset folder {folder} does not exist: choose the folder that holds your photos")
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder: choose the folder that holds your photos")
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise DatasetError(f"cannot read dataset folder {folder} ({e.strerror or e}): check its permissions") from e
    return sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.name)


def _is_companion(name: str, stems: set[str]) -> bool:
    """Whether `name` is the caption or mask file of an image whose stem is in `stems`."""
    if name.endswith(CAPTION_SUFFIX) and name[: -len(CAPTION_SUFFIX)] in stems:
        return True
    return any(name.endswith(s) and name[: -len(s)] in stems for s in MASK_SUFFIXES)


def _not_image(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == CAPTION_SUFFIX:
        return f"caption without an image (no {path.stem}.png, .jpg or .webp next to it)"
    return f"not an image ({f'{suffix} not supported' if suffix else 'no file extension'}: use {_FORMATS})"


def _reasons(skipped: list[Skipped]) -> str:
    lines = [f"  {s.path.name}: {s.reason}" for s in skipped[:LISTED]]
    if len(skipped) > LISTED:
        lines.append(f"  ... and {len(skipped) - LISTED} more")
    return "\n".join(lines)


def _load_sample(
    path: Path, names: set[str], seen: dict[bytes, str], sizes: list[tuple[int, int]], min_size: int, mask_source: str
) -> Sample:
    """Decode, check and tensorise one image at the size of `sizes` nearest its aspect ratio; `seen` maps pixel
    digests to the names already kept."""
    colour, alpha = _decode(path, "image")
    h, w = colour.shape[:2]
    if min(h, w) < min_size:
        raise _Skip(f"too small ({w}x{h} px, need at least {min_size} px on the short side)")
    if alpha is not None and not alpha.any():
        raise _Skip("fully transparent (no visible pixels)")
    rgb = _over_white(colour, alpha)
    digest = hashlib.sha256(f"{w}x{h}:".encode() + rgb.tobytes()).digest()
    if digest in seen:
        raise _Skip(f"duplicate of {seen[digest]}")
    mask = _choose_mask(path, alpha, names, mask_source, (h, w))
    caption = _caption(path, names)
    seen[digest] = path.name
    size = nearest_bucket(w, h, sizes)
    image = torch.from_numpy(_fit(rgb, size, Image.Resampling.LANCZOS)).permute(2, 0, 1) / 127.5 - 1
    mask_t = None if mask is None else torch.from_numpy(_fit(mask, size, Image.Resampling.BILINEAR)) / 255
    return Sample(path, image.contiguous(), mask_t, caption)


def _decode(path: Path, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Upright (EXIF rotation applied) colour [H, W, 3] uint8, not composited, and alpha [H, W] uint8.

    Alpha is None when the file has none or it is fully opaque. Any decoding failure becomes
    _Skip("unreadable <what> (...)").
    """
    try:
        with Image.open(path) as im:  # reads the header only: the size is known before any pixel is decoded
            if im.width * im.height > MAX_PIXELS:
                raise _Skip(f"{what} of {im.width}x{im.height} px is larger than {MAX_PIXELS // 2**20} megapixels")
            return _pixels(ImageOps.exif_transpose(im))
    except _Skip:
        raise
    except UnidentifiedImageError as e:
        raise _Skip(f"unreadable {what} (cannot identify image file)") from e
    except Exception as e:  # broken files fail inside Pillow in many ways (OSError, SyntaxError, struct.error, ...)
        message = (str(e).splitlines() or [""])[0].replace(str(path), path.name) or type(e).__name__
        raise _Skip(f"unreadable {what} ({message})") from e


def _pixels(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour [H, W, 3] uint8 and alpha [H, W] uint8 (None if absent or all 255) for any Pillow mode."""
    if im.mode in _HIGH_DEPTH_MODES:
        grey = np.clip(np.rint(np.asarray(im).astype(np.float64) / 257), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), None
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3]
        return rgba[..., :3], (None if alpha.min() == 255 else alpha)
    return np.asarray(im.convert("RGB")), None


def _over_white(colour: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Colour [H, W, 3] uint8 composited over white with alpha [H, W] uint8 (None = opaque)."""
    if alpha is None:
        return np.ascontiguousarray(colour)
    a = alpha[..., None].astype(np.float32) / 255
    return np.rint(colour * a + 255 * (1 - a)).astype(np.uint8)


def _choose_mask(
    path: Path, alpha: np.ndarray | None, names: set[str], mask_source: str, shape: tuple[int, int]
) -> np.ndarray | None:
    """Mask [H, W] uint8 (255 = object) for the image at `path` of `shape` (H, W), per mask_source."""
    if mask_source in ("alpha", "auto") and alpha is not None:
        return alpha
    if mask_source in ("files", "auto"):
        mask_name = next((path.stem + s for s in MASK_SUFFIXES if path.stem + s in names), None)
        if mask_name is not None:
            return _read_mask(path.parent / mask_name, shape)
    return None


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Mask file as [H', W'] uint8 (white = object, transparent = background); same aspect as `shape`."""
    colour, alpha = _decode(path, f"mask {path.name}")
    grey = colour.astype(np.float32).mean(axis=2)
    if alpha is not None:
        grey = grey * alpha / 255
    (h, w), (mh, mw) = shape, grey.shape
    if abs(mw * h - w * mh) > 0.01 * w * mh:
        raise _Skip(f"mask {path.name} is {mw}x{mh} px but the image is {w}x{h} px (aspect ratios differ)")
    return np.rint(grey).astype(np.uint8)


def _caption(path: Path, names: set[str]) -> str:
    name = path.stem + CAPTION_SUFFIX
    if name not in names:
        return ""
    try:
        return read_regular(path.parent / name, MAX_CAPTION_BYTES).decode("utf-8-sig", errors="replace").strip()
    except OSError as e:
        raise _Skip(f"unreadable caption {name} ({e.strerror or e})") from e


def _fit(pixels: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Centre-crop [H, W(, C)] uint8 to the aspect ratio of `size` (width, height) and resize to it; float32
    [height, width(, C)] in 0..255."""
    img = Image.fromarray(pixels)
    (w, h), (width, height) = img.size, size
    crop_w, crop_h = (w, round(w * height / width)) if w * height <= h * width else (round(h * width / height), h)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    img = img.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), resample)
    return np.asarray(img, dtype=np.float32)


def _blur_axis(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """Gaussian blur of x [1, 1, h, w] along dim 2 (rows) or 3 (columns), sigma in px, edges replicated."""
    radius = math.ceil(3 * sigma)
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    if dim == 2:
        return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
