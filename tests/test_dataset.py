"""Dataset folder loading: every image mode, companions, bad files, errors, read-only access, soft masks."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from perfusion.dataset import (
    IMAGE_SUFFIXES,
    Dataset,
    DatasetError,
    Sample,
    Skipped,
    _pixels,
    buckets,
    by_size,
    load_dataset,
    nearest_bucket,
    scan_folder,
    soft_mask,
)

RED, BLUE = (220, 20, 30), (20, 40, 200)


def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    """[h, w, 3] uint8 random colours with a bright rectangle, never a blank image."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = (250, 240, 10)
    return rgb


def save_rgb(path, w=96, h=80, seed=0, **kw):
    Image.fromarray(noise(w, h, seed)).save(path, **kw)
    return path


def disc_alpha(w: int, h: int) -> np.ndarray:
    """[h, w] uint8: an opaque disc with a soft rim on a transparent background."""
    y, x = np.mgrid[:h, :w]
    r = np.hypot(x - w / 2, y - h / 2)
    return np.clip((min(w, h) / 3 - r) * 60, 0, 255).astype(np.uint8)


def one(folder, **kw) -> Sample:
    data = load_dataset(folder, **kw)
    assert len(data.samples) == 1, data.summary()
    return data.samples[0]


def snapshot(folder):
    """name -> (mtime ns, size, content hash) for every entry, folders included."""
    return {
        p.name: (p.stat().st_mtime_ns, p.stat().st_size, p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.iterdir())
    }


# ---- modes -------------------------------------------------------------------------------------------


def test_rgb_image_is_centre_cropped_to_a_square_tensor_in_range(tmp_path):
    rgb = noise(120, 80)
    rgb[..., 0] = np.minimum(rgb[..., 0], 150)
    rgb[:, :20] = RED  # the two side bands fall outside the centre square
    rgb[:, 100:] = RED
    Image.fromarray(rgb).save(tmp_path / "a.png")
    s = one(tmp_path, resolution=80)
    assert s.image.shape == (3, 80, 80) and s.image.dtype == torch.float32
    assert s.mask is None and s.caption == "" and s.path == tmp_path / "a.png"
    expected = torch.from_numpy(rgb[:, 20:100].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(s.image, expected, atol=1e-6)
    big = one(tmp_path, aspect="square").image  # LANCZOS upscale to 512 px stays in range
    assert big.shape == (3, 512, 512) and big.min() >= -1 and big.max() <= 1


# ---- aspect-ratio buckets ----------------------------------------------------------------------------


def test_buckets_keep_the_area_and_are_symmetric():
    sizes = buckets(512)
    assert sizes == [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512),
                     (576, 448), (640, 384), (768, 320), (1024, 256)]  # fmt: skip
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert {(h, w) for w, h in sizes} == set(sizes)
    assert (832, 1216) in buckets(1024)  # SDXL's usual portrait size
    assert buckets(48) == [(48, 48)]  # below two multiples: square only (the mini world)
    assert buckets(80) == [(80, 80)]  # no smaller square beside the resolution
    assert nearest_bucket(3000, 4000, sizes) == (448, 576)
    assert nearest_bucket(1920, 1080, sizes) == (640, 384)
    assert nearest_bucket(513, 512, sizes) == (512, 512)
    assert nearest_bucket(100, 2000, sizes) == (256, 1024)  # beyond the last bucket: the last one


def test_a_portrait_keeps_its_top_and_bottom_where_a_square_loses_them(tmp_path):
    rgb = np.full((600, 300, 3), 128, np.uint8)
    rgb[:60], rgb[-60:] = RED, BLUE  # head and feet, 10 % each
    alpha = np.full((600, 300), 255, np.uint8)
    alpha[:, :30] = 0  # a transparent left edge, so the mask is not trivial
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "tall.png")
    s = one(tmp_path, resolution=256)
    assert s.image.shape == (3, 320, 192) and s.mask.shape == (320, 192)  # 0.6 is the nearest aspect to 0.5
    red, blue = torch.tensor(RED) / 127.5 - 1, torch.tensor(BLUE) / 127.5 - 1
    assert torch.allclose(s.image[:, 2, 96], red, atol=0.02) and torch.allclose(s.image[:, -3, 96], blue, atol=0.02)
    assert s.mask[160, 2] < 0.05 and s.mask[160, 100] > 0.95  # the mask went through the same crop
    square = one(tmp_path, resolution=256, aspect="square")
    assert square.image.shape == (3, 256, 256)
    assert not torch.allclose(square.image[:, 2, 128], red, atol=0.2)  # control: the crop cut the head off
    assert not torch.allclose(square.image[:, -3, 128], blue, atol=0.2)


def test_the_summary_names_the_sizes_and_bad_aspect_values_are_refused(tmp_path):
    save_rgb(tmp_path / "a.png", 96, 96)
    assert load_dataset(tmp_path, resolution=128).summary() == "1 usable image"
    save_rgb(tmp_path / "b.png", 80, 160, seed=1)
    save_rgb(tmp_path / "c.png", 81, 160, seed=2)
    data = load_dataset(tmp_path, resolution=128, multiple=32)
    assert [tuple(s.image.shape[1:]) for s in data.samples] == [(128, 128), (160, 96), (160, 96)]
    assert data.summary() == "3 usable images (1 at 128x128, 2 at 96x160)"
    assert by_size([s.image for s in data.samples]) == {(128, 128): [0], (160, 96): [1, 2]}
    with pytest.raises(ValueError, match="aspect must be one of buckets, square"):
        load_dataset(tmp_path, aspect="wide")


def test_rgba_alpha_becomes_the_mask_and_colour_is_composited_over_white(tmp_path):
    alpha = disc_alpha(80, 80)
    Image.fromarray(np.dstack([noise(80, 80), alpha])).save(tmp_path / "a.png")
    s = one(tmp_path, resolution=80)
    assert torch.allclose(s.mask, torch.from_numpy(alpha / 255).float(), atol=1e-6)
    assert torch.all(s.image[:, alpha == 0] == 1)  # transparent background -> white
    assert s.image[:, alpha == 255].min() < 0  # the opaque disc keeps its colours


def test_all_opaque_alpha_is_not_a_mask(tmp_path):
    Image.fromarray(np.dstack([noise(80, 80), np.full((80, 80), 255, np.uint8)])).save(tmp_path / "a.png")
    assert one(tmp_path, resolution=64).mask is None


def test_grey_with_alpha_la(tmp_path):
    grey = noise(80, 80)[..., 1]
    alpha = disc_alpha(80, 80)
    Image.fromarray(np.dstack([grey, alpha]), mode="LA").save(tmp_path / "a.png")
    s = one(tmp_path, resolution=80)
    assert torch.allclose(s.mask, torch.from_numpy(alpha / 255).float(), atol=1e-6)
    opaque = alpha == 255
    assert torch.equal(s.image[0], s.image[2])
    assert torch.allclose(s.image[1][opaque], torch.from_numpy(grey[opaque] / 127.5 - 1).float(), atol=1e-6)


def test_palette_with_transparency(tmp_path):
    index = np.random.default_rng(1).integers(1, 16, (80, 80), dtype=np.uint8)
    index[:, :30] = 0  # index 0 is transparent
    im = Image.fromarray(index, mode="P")
    im.putpalette(list(np.random.default_rng(2).integers(0, 256, 48)))
    im.save(tmp_path / "a.png", transparency=0)
    s = one(tmp_path, resolution=80)
    assert torch.equal(s.mask, torch.from_numpy((index != 0).astype(np.float32)))
    assert torch.all(s.image[:, :, :30] == 1)


def test_palette_without_transparency_has_no_mask(tmp_path):
    Image.fromarray(noise(80, 80)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "a.png")
    s = one(tmp_path, resolution=64)
    assert s.mask is None and s.image.min() < 0


def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path):
    y, x = np.mgrid[:80, :96]
    grey = (10000 + 300 * x + 100 * y).astype(np.uint16)  # 10000..47400 of 65535
    Image.fromarray(grey).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode.startswith("I")
    s = one(tmp_path, resolution=80)
    expected = np.rint(grey[:, 8:88] / 257) / 127.5 - 1
    assert torch.allclose(s.image[0], torch.from_numpy(expected).float(), atol=1e-6)
    assert s.image.max() < 0.5  # not white


@pytest.mark.parametrize("mode", ["I", "I;16B"])
def test_other_16_bit_grey_modes_scale_the_same(mode):
    grey = np.array([[0, 257, 30000, 65535]], dtype=np.uint16)
    im = (
        Image.fromarray(grey.astype(np.int32))
        if mode == "I"
        else Image.frombytes(mode, (4, 1), grey.astype(">u2").tobytes())
    )
    assert im.mode == mode
    colour, alpha = _pixels(im)
    assert alpha is None and colour[0, :, 0].tolist() == [0, 1, 117, 255] and np.all(colour[..., 0] == colour[..., 2])


def test_palette_alpha_mode_pa_keeps_alpha():
    im = Image.fromarray(noise(8, 8)).convert("PA")  # no file format here opens as PA: build it in memory
    im.putalpha(Image.fromarray(disc_alpha(8, 8)))
    assert im.mode == "PA"
    _, alpha = _pixels(im)
    assert np.array_equal(alpha, disc_alpha(8, 8))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = np.zeros((80, 96, 4), np.uint8)
    cmyk[:, :48] = (0, 255, 255, 0)  # red
    cmyk[:, 48:, 0] = np.random.default_rng(3).integers(0, 256, (80, 48))
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "a.jpg", quality=95)
    s = one(tmp_path, resolution=80)
    r, g, b = s.image[:, 40, 10]
    assert r > 0.8 and g < -0.8 and b < -0.8


def test_l_and_1_bit_images_are_grey(tmp_path):
    Image.fromarray(noise(80, 80)[..., 0]).save(tmp_path / "a.png")
    checker = (np.indices((80, 80)).sum(axis=0) // 8) % 2 == 0
    Image.fromarray(checker).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as im:
        assert im.mode == "1"
    a, b = load_dataset(tmp_path, resolution=80).samples
    assert torch.equal(a.image[0], a.image[1]) and torch.equal(a.image[1], a.image[2])
    assert torch.equal(b.image[0], torch.from_numpy(np.where(checker, 1.0, -1.0)).float())


def test_exif_rotation_is_applied(tmp_path):
    stored = np.full((120, 200, 3), BLUE, np.uint8)  # 200 wide, 120 high
    stored[:30, 80:120] = RED  # near the top edge, in the middle
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: 120 wide, 200 high
    Image.fromarray(stored).save(tmp_path / "a.jpg", exif=exif, quality=95)
    s = one(tmp_path, resolution=120)
    # upright the top edge is the right edge: red at x 90..119, y 80..119, and the crop keeps y 40..159
    assert s.image[0, 60, 105] > 0.5 and s.image[2, 60, 105] < -0.5
    assert s.image[0, 10, 60] < -0.5 and s.image[2, 10, 60] > 0  # where an unrotated red would sit


def test_upper_case_suffixes_are_images(tmp_path):
    save_rgb(tmp_path / "A.PNG", seed=1)
    save_rgb(tmp_path / "b.JPEG", seed=2)
    save_rgb(tmp_path / "c.webp", seed=3, lossless=True)
    assert [p.name for p in scan_folder(tmp_path)[0]] == ["A.PNG", "b.JPEG", "c.webp"]
    assert len(load_dataset(tmp_path, resolution=32).samples) == 3


# ---- companions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mask.png", "_mask.png", "-mask.png"])
def test_companion_mask_and_caption_are_picked_up(tmp_path, suffix):
    save_rgb(tmp_path / "dog.jpg", 80, 80)
    mask = np.zeros((80, 80), np.uint8)
    mask[10:50, 20:70] = 255
    Image.fromarray(mask).save(tmp_path / f"dog{suffix}")
    (tmp_path / "dog.txt").write_text("  a photo of hugsy on the beach \n", encoding="utf-8")
    images, skipped = scan_folder(tmp_path)
    assert [p.name for p in images] == ["dog.jpg"] and skipped == []
    s = one(tmp_path, resolution=80)
    assert s.caption == "a photo of hugsy on the beach"
    assert torch.equal(s.mask, torch.from_numpy(mask / 255).float())


def test_mask_file_at_lower_resolution_with_the_same_aspect_is_used(tmp_path):
    save_rgb(tmp_path / "dog.png", 160, 160)
    Image.fromarray(np.full((80, 80), 255, np.uint8)).save(tmp_path / "dog_mask.png")
    assert torch.all(one(tmp_path, resolution=64).mask == 1)


def test_mask_file_with_another_aspect_skips_the_image(tmp_path):
    save_rgb(tmp_path / "a.png", 96, 80, seed=1)
    save_rgb(tmp_path / "dog.png", 160, 80, seed=2)
    Image.fromarray(np.full((80, 80), 255, np.uint8)).save(tmp_path / "dog_mask.png")
    data = load_dataset(tmp_path, resolution=32)
    assert [s.path.name for s in data.samples] == ["a.png"]
    assert data.skipped == [
        Skipped(tmp_path / "dog.png", "mask dog_mask.png is 80x80 px but the image is 160x80 px (aspect ratios differ)")
    ]


@pytest.mark.parametrize("source, expected", [("auto", "alpha"), ("alpha", "alpha"), ("files", "file"), ("none", None)])
def test_mask_source_picks_alpha_file_or_nothing(tmp_path, source, expected):
    alpha = disc_alpha(80, 80)
    Image.fromarray(np.dstack([noise(80, 80), alpha])).save(tmp_path / "a.png")
    file_mask = np.zeros((80, 80), np.uint8)
    file_mask[:40] = 255
    Image.fromarray(file_mask).save(tmp_path / "a.mask.png")
    save_rgb(tmp_path / "b.png", 80, 80, seed=5)
    Image.fromarray(file_mask).save(tmp_path / "b.mask.png")
    a, b = load_dataset(tmp_path, resolution=80, mask_source=source).samples
    want = {"alpha": alpha, "file": file_mask, None: None}[expected]
    assert (a.mask is None) if want is None else torch.equal(a.mask, torch.from_numpy(want / 255).float())
    # an opaque image falls back to its file in 'auto' only
    assert (b.mask is not None) == (source in ("auto", "files"))


def test_bad_mask_source_is_rejected(tmp_path):
    save_rgb(tmp_path / "a.png")
    with pytest.raises(ValueError, match="mask_source"):
        load_dataset(tmp_path, mask_source="depth")


# ---- bad files ----------------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """a.png, b.png (good), c.png (copy of a), d.webp (lossless re-encode of a), and a set of bad files."""
    save_rgb(tmp_path / "a.png", seed=1)
    save_rgb(tmp_path / "b.png", seed=2)
    shutil.copy(tmp_path / "a.png", tmp_path / "c.png")
    save_rgb(tmp_path / "d.webp", seed=1, lossless=True)
    (tmp_path / "e.png").write_text("not really a png")
    save_rgb(tmp_path / "f.jpg", seed=4)
    (tmp_path / "f.jpg").write_bytes((tmp_path / "f.jpg").read_bytes()[:600])
    save_rgb(tmp_path / "g.png", 40, 30, seed=6)
    Image.fromarray(noise(80, 80)).save(tmp_path / "h.gif")
    (tmp_path / "notes.md").write_text("shot in june")
    (tmp_path / "orphan.txt").write_text("a caption for nothing")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    return tmp_path


def test_bad_files_are_skipped_with_reasons(mixed):
    before = snapshot(mixed)
    data = load_dataset(mixed, resolution=32)
    assert [s.path.name for s in data.samples] == ["a.png", "b.png"]
    reasons = {s.path.name: s.reason for s in data.skipped}
    assert list(reasons) == sorted(reasons)
    assert reasons.pop("f.jpg").startswith("unreadable image (")
    assert reasons == {
        "c.png": "duplicate of a.png",
        "d.webp": "duplicate of a.png",
        "e.png": "unreadable image (cannot identify image file)",
        "g.png": "too small (40x30 px, need at least 64 px on the short side)",
        "h.gif": "not an image (.gif not supported: use png, jpg or webp)",
        "notes.md": "not an image (.md not supported: use png, jpg or webp)",
        "orphan.txt": "caption without an image (no orphan.png, .jpg or .webp next to it)",
        "sub": "folder (subfolders are not read)",
    }
    assert snapshot(mixed) == before  # nothing written, touched or added


def test_scan_folder_decodes_nothing_and_lists_by_name(mixed):
    images, skipped = scan_folder(mixed)
    assert [p.name for p in images] == ["a.png", "b.png", "c.png", "d.webp", "e.png", "f.jpg", "g.png"]
    assert [s.path.name for s in skipped] == ["h.gif", "notes.md", "orphan.txt", "sub"]
    assert all(p.suffix.lower() in IMAGE_SUFFIXES for p in images)


def test_summary_lists_each_skipped_file(mixed):
    for name in ("e.png", "f.jpg", "notes.md", "orphan.txt", "c.png", "d.webp"):
        (mixed / name).unlink()
    (mixed / "sub").rmdir()
    data = load_dataset(mixed, resolution=32)
    assert data.summary() == (
        "2 usable images, 2 skipped:\n"
        "  g.png: too small (40x30 px, need at least 64 px on the short side)\n"
        "  h.gif: not an image (.gif not supported: use png, jpg or webp)"
    )
    assert Dataset(data.samples[:1], []).summary() == "1 usable image"


def test_loading_is_deterministic(mixed):
    a, b = load_dataset(mixed, resolution=32), load_dataset(mixed, resolution=32)
    assert a.skipped == b.skipped
    assert all(torch.equal(x.image, y.image) and x.path == y.path for x, y in zip(a.samples, b.samples))


def test_fully_transparent_image_is_skipped(tmp_path):
    save_rgb(tmp_path / "a.png")
    Image.fromarray(np.dstack([noise(80, 80), np.zeros((80, 80), np.uint8)])).save(tmp_path / "b.png")
    assert load_dataset(tmp_path, resolution=32).skipped == [
        Skipped(tmp_path / "b.png", "fully transparent (no visible pixels)")
    ]


# ---- nothing usable -----------------------------------------------------------------------------------


def test_missing_folder_raises_naming_it(tmp_path):
    for call in (scan_folder, load_dataset):
        with pytest.raises(DatasetError, match="does not exist") as err:
            call(tmp_path / "nope")
        assert str(tmp_path / "nope") in str(err.value)


def test_a_file_is_not_a_folder(tmp_path):
    path = save_rgb(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="not a folder") as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_empty_folder_raises_naming_it(tmp_path):
    (tmp_path / ".hidden").write_text("x")
    with pytest.raises(DatasetError, match="is empty") as err:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_only_bad_files_raise_with_every_reason(tmp_path):
    (tmp_path / "e.png").write_text("not really a png")
    save_rgb(tmp_path / "g.png", 40, 30)
    Image.fromarray(noise(80, 80)).save(tmp_path / "h.gif")
    before = snapshot(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    message = str(err.value)
    assert message.startswith(f"no usable images in {tmp_path}:\n")
    assert message.endswith("Add 1-10 photos (png, jpg or webp), at least 64 px on the short side.")
    for line in (
        "e.png: unreadable image (cannot identify image file)",
        "g.png: too small (40x30 px",
        "h.gif: not an image (.gif not supported",
    ):
        assert line in message
    assert snapshot(tmp_path) == before


# ---- soft_mask ----------------------------------------------------------------------------------------


def test_soft_mask_has_mean_one_and_the_grid_shape():
    mask = torch.zeros(512, 512)
    mask[100:300, 150:400] = 1
    for size, shape in ((64, (64, 64)), ((48, 80), (48, 80))):
        m = soft_mask(mask, size)
        assert m.shape == shape and m.dtype == torch.float32
        assert float(m.mean()) == pytest.approx(1.0, abs=1e-5) and m.min() >= 0


def test_soft_mask_softens_edges_and_blur_zero_keeps_them():
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    hard = soft_mask(mask, 64, blur=0)
    assert torch.equal(hard, mask * 2)  # half the image is object: weights 2 there, 0 elsewhere
    soft = soft_mask(mask, 64)
    row = soft[10]
    assert 0 < row[33] < row[30] < 2 and row[0] == pytest.approx(2, abs=1e-3)
    assert torch.all(row[1:] <= row[:-1] + 1e-6)  # falls off monotonically


def test_soft_mask_of_nothing_is_all_ones():
    m = soft_mask(torch.zeros(32, 32), (8, 16))
    assert torch.equal(m, torch.ones(8, 16))


def test_soft_mask_rejects_a_batch():
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        soft_mask(torch.ones(2, 8, 8), 4)
