"""The quality benchmark's scoring on rendered ground truth."""

from __future__ import annotations

from perfusion.world.quality import PROMPTS, score
from perfusion.world.scenes import Scene, Thing, render


def test_score_rewards_identity_and_asked_attributes():
    identity = ("checkered", "red")
    ball = Thing("ball", "red", "checkered", "big", "left")
    assert score(render(Scene((ball,), "white", 1)), PROMPTS[0], identity) == (True, 1.0)
    plain = Thing("ball", "red", "plain", "big", "right")
    hit, align = score(render(Scene((plain,), "white", 1)), PROMPTS[0], identity)
    assert not hit and align == 0.5  # background right, position wrong
    pair = Scene(
        (Thing("cone", "yellow", "plain", "small", "top"), Thing("ball", "red", "checkered", "small", "bottom")),
        "gray",
        2,
    )
    assert score(render(pair), PROMPTS[6], identity) == (True, 1.0)  # concept second, cone first
