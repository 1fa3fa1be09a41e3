"""The miniature world's scenes: deterministic, captions name every attribute, checkered held out."""

from __future__ import annotations

import numpy as np

from perfusion.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    Thing,
    from_tensor,
    owner_map,
    render,
    scenes_and_captions,
    to_tensor,
)


def batch(seed: int, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """What the model trainer draws for one step: images uint8 [n, 32, 32, 3], captions, scenes."""
    scenes, captions = scenes_and_captions(seed, n)
    return np.stack([render(s) for s in scenes]), captions, scenes


def test_batches_are_deterministic_and_varied():
    a, caps_a, _ = batch(3, 16)
    b, caps_b, _ = batch(3, 16)
    c, _, _ = batch(4, 16)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps_a == caps_b and not np.array_equal(a, c)
    assert len({im.tobytes() for im in a}) == 16


def test_captions_name_every_defining_attribute():
    for seed in range(200):
        _, caps, scenes = batch(seed, 1)
        text, scene = caps[0], scenes[0]
        assert f"on a {scene.background} background" in text
        for t in scene.things:
            assert t.shape in text and t.colour in text
            assert (t.pattern in text) or t.pattern == "plain"
            assert ("centre" if t.position == "centre" else t.position) in text


def test_checkered_is_never_in_training_batches():
    for seed in range(50):
        _, caps, scenes = batch(seed, 32)
        assert all(t.pattern != "checkered" for s in scenes for t in s.things)
        assert not any("checkered" in c for c in caps)


def test_render_draws_the_object_where_asked():
    scene = Scene((Thing("box", "red", "plain", "big", "left"),), "black", seed=1)
    img, owner = render(scene), owner_map(scene)
    ys, xs = np.nonzero(owner == 0)
    assert 6 < xs.mean() < 12 and 13 < ys.mean() < 19  # left, vertically centred
    assert np.abs(img[ys, xs].mean(0) - COLOURS["red"]).max() < 10
    assert np.abs(img[0, 31] - BACKGROUNDS["black"]).max() < 2
    assert np.array_equal(from_tensor(to_tensor(img[None]))[0], img)
    assert set(SHAPES) == {"ball", "box", "cone", "star", "ring"}
