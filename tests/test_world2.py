"""World 2: scenes, and the identity reader with its negative controls (what must NOT read as the instance)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import numpy as np

from perfusion.world.w2.analyze import is_instance, read, read_pair, read_places
from perfusion.world.w2.controls import CONTROLS, INSTANCES, confusion, control_image, placements
from perfusion.world.w2.scenes import (
    COLOURS,
    PATTERNS,
    Scene,
    Thing,
    owner_map,
    random_scene,
    render,
    render_with_cover,
    scenes_and_captions,
)


def batch(seed: int, n: int, **layout) -> tuple[np.ndarray, list[str], list[Scene]]:
    """What the model trainer draws for one step: images uint8 [n, 48, 48, 3], captions, scenes."""
    scenes, captions = scenes_and_captions(seed, n, **layout)
    return np.stack([render(s) for s in scenes]), captions, scenes


def _away_from(inside: np.ndarray) -> np.ndarray:
    """Pixels at least 2 px from `inside` (its edge pixels blend with the background)."""
    near = inside.copy()
    for _ in range(2):
        near = near | np.roll(near, 1, 0) | np.roll(near, -1, 0) | np.roll(near, 1, 1) | np.roll(near, -1, 1)
    return ~near


def test_batches_are_deterministic_and_captions_never_name_the_accent():
    a, caps, scenes = batch(3, 64)
    b, caps_b, _ = batch(3, 64)
    assert a.shape == (64, 48, 48, 3) and np.array_equal(a, b) and caps == caps_b
    assert {t.pattern for s in scenes for t in s.things} == set(PATTERNS)
    assert {len(s.things) for s in scenes} == {1, 2, 3}
    for text, scene in zip(caps, scenes):
        assert f"on a {scene.background} background" in text
        named = {w for w in text.split() if w in COLOURS} | ({"cyan"} if "cyan" in text else set())
        assert named == {t.colour for t in scene.things}  # the accents stay unnamed
        for t in scene.things:
            assert t.shape in text and (t.pattern in text or t.pattern == "plain")
            assert (t.accent is None) == (t.pattern == "plain") and t.accent != t.colour


def test_colourless_captions_leave_colours_out_and_change_nothing_at_zero():
    _, caps, scenes = batch(3, 64)
    _, same, _ = batch(3, 64, colourless=0.0)
    assert same == caps  # the option draws nothing when off: every caption of before stays the same
    # captions only from here (rendering the images adds nothing to them)
    scenes_b, none = scenes_and_captions(3, 64, colourless=1.0)
    assert [s.things for s in scenes_b] == [s.things for s in scenes]  # the same scenes, only fewer words
    assert not any(w in COLOURS for text in none for w in text.split())
    for text, scene in zip(none, scenes):
        assert text == "" or all(t.shape in text for t in scene.things)
    many, some = scenes_and_captions(3, 400, colourless=0.3)
    named = [sum(w in COLOURS for w in text.split()) for text in some if text]
    things = sum(len(s.things) for s in many)
    assert 0.6 * things < sum(named) < 0.8 * things  # about 70 % of the colours still named


def test_render_paints_body_and_accent_inside_the_silhouette():
    scene = Scene((Thing("box", "red", "two-tone", "big", "centre", "blue"),), "black", seed=1)
    img, owner = render(scene).astype(int), owner_map(scene)
    ys, xs = np.nonzero(owner == 0)
    top, bottom = (
        img[ys[ys < ys.mean() - 2], xs[ys < ys.mean() - 2]],
        img[ys[ys > ys.mean() + 2], xs[ys > ys.mean() + 2]],
    )
    assert np.abs(top.mean(0) - COLOURS["red"]).max() < 8 and np.abs(bottom.mean(0) - COLOURS["blue"]).max() < 8
    assert (img[_away_from(owner >= 0)] == (15, 15, 15)).all()


def test_the_cover_of_a_scene_is_where_its_objects_are():
    scenes, _ = scenes_and_captions(5, 12)
    for scene in scenes:
        img, cover = render_with_cover(scene)
        owner = owner_map(scene)
        assert np.array_equal(img, render(scene))
        assert np.array_equal(cover > 0.5, owner >= 0)  # objects never overlap: their union is the owner map's
        assert (cover[_away_from(owner >= 0)] == 0).all() and (cover[_away_from(owner < 0)] == 1).all()
        edge = (cover > 0) & (cover < 1)
        assert edge.any()  # the box filter's partly covered pixels: a fraction, not a threshold
    empty = Scene((), "gray")
    assert not render_with_cover(empty)[1].any()


def test_reader_reads_rendered_ground_truth():
    rng = random.Random(11)
    wrong, n = Counter(), 200
    for _ in range(n):
        scene = random_scene(rng, two_objects=0.0, three_objects=0.0)
        thing, r = scene.things[0], read(render(scene))
        for attr in ("shape", "size", "position", "pattern"):
            wrong[attr] += getattr(r, attr) != getattr(thing, attr)
        wrong["background"] += r.background != scene.background
        wrong["colour"] += not r.shows_colour(thing.colour)
        wrong["instance"] += not is_instance(r, thing)
    for attr in ("shape", "size", "position", "background", "colour"):
        assert wrong[attr] <= 0.01 * n, wrong
    assert wrong["pattern"] <= 0.04 * n and wrong["instance"] <= 0.05 * n, wrong


def test_reader_reads_pairs_and_triples():
    rng = random.Random(12)
    for n, layout in ((2, dict(two_objects=1.0, three_objects=0.0)), (3, dict(two_objects=0.0, three_objects=1.0))):
        wrong = 0
        for _ in range(30):
            scene = random_scene(rng, **layout)
            places = tuple(t.position for t in scene.things)
            assert len(places) == n
            wrong += sum(not is_instance(r, t) for t, r in zip(scene.things, read_places(render(scene), places)))
        assert wrong <= 0.06 * 30 * n, (n, wrong)
    scene = random_scene(random.Random(3), two_objects=1.0, three_objects=0.0)
    layout = "left-right" if scene.things[0].position == "left" else "top-bottom"
    assert read_pair(render(scene), layout) == read_places(render(scene), tuple(t.position for t in scene.things))


def test_identity_needs_the_pattern_not_the_tint():
    """Every look-alike at every position and size reads as not-the-instance; the instance itself does."""
    table = confusion(seeds=(0,))
    assert table["instance"] >= 0.95, table
    assert all(table[c] == 0.0 for c in CONTROLS), table


def test_controls_are_look_alikes():
    """The controls keep what a weak reader would look at: silhouette and (for 'mean colour') average colour."""
    scene = placements(INSTANCES[0])[0]
    instance, owner = render(scene).astype(float), owner_map(scene)
    inside, away = owner == 0, _away_from(owner == 0)
    for name in CONTROLS:
        img = control_image(scene, name).astype(float)
        assert not np.array_equal(img, instance), name
        if name != "other shape":
            assert (img[away] == instance[away]).all(), name  # background untouched
    mean = control_image(scene, "mean colour").astype(float)
    assert np.abs(mean[inside].mean(0) - instance[inside].mean(0)).max() < 12
    assert read(mean).pattern == "plain" and not is_instance(read(mean), scene.things[0])


def test_benchmark_judges_rendered_ground_truth():
    from perfusion.world.w2.quality import group_prompts, judge, other_object, single_prompts

    chekka, boxy, stripo = INSTANCES[:3]
    other = other_object([chekka], random.Random(0))
    assert other.shape != chekka.shape and other.colour not in (chekka.colour, chekka.accent)
    prompts = single_prompts(other)
    left = Scene((replace(chekka, position="left"),), "white", 1)
    assert judge(render(left), prompts[0], [chekka]) == ([True], 1.0, [True])
    plain = Scene((replace(chekka, position="right", pattern="plain", accent=None),), "white", 1)
    identity, alignment, words = judge(render(plain), prompts[0], [chekka])
    assert identity == [False] and alignment == 0.5 and words == [False]  # background right, position wrong
    second = Scene((replace(other, position="top"), replace(chekka, size="small", position="bottom")), "gray", 2)
    assert judge(render(second), prompts[6], [chekka]) == ([True], 1.0, [True])  # concept second, other first
    [pair] = [p for p in group_prompts(2) if p.places == ("left", "right") and p.objects == (1, 0)]
    scene = Scene(
        (replace(boxy, size="small", position="left"), replace(chekka, size="small", position="right")), "gray", 3
    )
    assert judge(render(scene), pair, [chekka, boxy]) == ([True, True], 1.0, [True, True])
    swapped = judge(
        render(scene),
        [p for p in group_prompts(2) if p.places == ("left", "right") and p.objects == (0, 1)][0],
        [chekka, boxy],
    )
    assert swapped[0] == [False, False]  # each where the other should be
    triple = group_prompts(3)[0]
    things = tuple(
        replace(look, size="small", position=place)
        for look, place in zip([(chekka, boxy, stripo)[k] for k in triple.objects], triple.places)
    )
    assert judge(render(Scene(things, triple.asked["background"], 4)), triple, [chekka, boxy, stripo])[0] == [True] * 3


def test_example_photos_cover_both_sizes_and_every_place():
    """An example folder's photos: half small (the odd one small), no place or background twice among the first
    five, the look unchanged; another seed, another order."""
    from perfusion.world.w2.examples import EXAMPLES, instance_scenes

    for k, look in enumerate(EXAMPLES.values()):
        for n in (1, 4, 5):
            things = [s.things[0] for s in instance_scenes(look, n, seed=k)]
            assert [t.size for t in things].count("small") == (n + 1) // 2
            assert (
                len({t.position for t in things}) == n and len({s.background for s in instance_scenes(look, 4, k)}) == 4
            )
            assert all(replace(t, size=look.size, position=look.position) == look for t in things)
    assert instance_scenes(EXAMPLES["boxy"], 5, seed=0) != instance_scenes(EXAMPLES["boxy"], 5, seed=1)


def test_benchmark_smoke_runs_on_any_instance_folders(tmp_path):
    """The CLI end to end on two user folders (quick: 3 training steps, 1 seed, 3 sampling steps), concepts
    trained with the hard lock: tables, plot and grid written, each concept its own row and the pair's."""
    import json

    from perfusion.concept import load_concept
    from perfusion.world.w2 import quality
    from perfusion.world.w2.examples import EXAMPLES, write_folder

    folders = [write_folder(tmp_path / name, EXAMPLES[name], 3)[0].parent for name in ("boxy", "duo")]
    captions = sorted(folders[1].glob("*.txt"))
    assert all(c.read_text().startswith(("a small [name] ", "a big [name] ")) for c in captions)
    for c in captions:  # a user's folder whose captions say only what follows the word
        c.write_text(c.read_text().split("[name] ", 1)[1])
    assert quality._captions_place_the_word(folders[0]) and not quality._captions_place_the_word(folders[1])
    args = ["--quick", "--out", str(tmp_path / "out"), "--train-lock", "hard", "--train-seed", "3"]
    assert quality.main([*args, "--instance", f"{folders[0]}:boxy", "--instance", f"{folders[1]}:duo:ball"]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["instance"] for r in rows if "instance" in r} == {"boxy", "duo"}
    assert [r["group"] for r in rows if "group" in r and r["method"] == "base (words)"] == ["boxy + duo"]
    assert [r["method"] for r in rows if r.get("group") == "boxy + duo"] == [
        "base (words)",
        "local approximate",
        "local regional",
        "local regional, attention blend",
    ]
    assert "key lock while training: hard, training seed 3" in (tmp_path / "out" / "results.md").read_text()
    duo = load_concept(tmp_path / "out" / "concepts" / "duo.safetensors")
    assert (duo.lock, duo.superclass) == ("hard", "ball")
    trained = duo.shared_metadata  # the world's recipe and the asked seed reached the trainer
    assert (trained["ss_seed"], trained["ss_batch_size_per_device"]) == ("3", str(quality.RECIPE["batch_size"]))
    assert float(trained["ss_learning_rate"]) == quality.RECIPE["lr_values"]
    assert float(trained["ss_text_encoder_lr"]) == quality.RECIPE["lr_embedding"]
    for picture in ("pareto.png", "samples.png"):
        assert (tmp_path / "out" / picture).stat().st_size > 1000
    # the firmer pair measurement: the pair only, the regional modes and each concept alone
    pairs = tmp_path / "pairs"
    instances = ["--instance", f"{folders[0]}:boxy", "--instance", f"{folders[1]}:duo:ball"]
    assert quality.main([*args[:1], "--out", str(pairs), "--only", "pairs", *instances]) == 0
    rows = json.loads((pairs / "results.json").read_text())
    assert [(r["group"], r["method"]) for r in rows] == [
        ("boxy + duo", "base (words)"),
        ("boxy + duo", "local regional"),
        ("boxy + duo", "local regional, attention blend"),
    ]
    assert "alone_all_identities" in rows[1] and not (pairs / "pareto.png").exists()


def test_firm_pair_prompts_put_every_order_and_layout_on_every_background():
    from perfusion.world.w2.quality import group_prompts
    from perfusion.world.w2.scenes import BACKGROUNDS

    prompts = group_prompts(2, every_background=True)
    seen = {(p.places, p.objects, p.asked["background"]) for p in prompts}
    assert len(prompts) == len(seen) == 16 and {b for *_, b in seen} == set(BACKGROUNDS)
    assert {(p.places, p.objects) for p in group_prompts(2)} == {(p.places, p.objects) for p in prompts}


def test_alone_scores_each_concept_at_its_own_place(monkeypatch):
    """The pairs' "alone" column: each concept is rendered from its own clause and read at the place the group
    prompt gives it. With renders that draw each instance where its clause says, every pair reads 1.0; with one
    look mistaken for another, 0.0; with the instance drawn at the other concept's place, 0.0."""

    from perfusion.world.w2 import quality

    chekka, boxy = INSTANCES[0], INSTANCES[1]
    concepts = [type("C", (), {"token": "chekka"})(), type("C", (), {"token": "boxy"})()]
    drawn_at = {"chekka": lambda place: place, "boxy": lambda place: place}
    flip = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

    def fake_render(adapter, texts, items, mode, beta, seeds, steps, seed=7):
        (concept,) = items
        look = {"chekka": chekka, "boxy": boxy}[concept.token]
        out = []
        for text in texts:
            place, background = text.split(" at the ")[1].split(" on a ")[0], text.split(" on a ")[1].split()[0]
            thing = replace(look, size="small", position=drawn_at[concept.token](place))
            out += [render(Scene((thing,), background, 5))] * seeds
        return np.stack(out)

    monkeypatch.setattr(quality, "render", fake_render)
    prompts = quality.group_prompts(2)
    score = lambda looks: quality.alone_all_identities(None, prompts, concepts, looks, 0.6, 2, 1, 11)  # noqa: E731
    assert score([chekka, boxy]) == 1.0
    assert score([chekka, chekka]) == 0.0  # boxy's images are not chekka
    drawn_at["boxy"] = lambda place: flip[place]
    assert score([chekka, boxy]) == 0.0  # boxy drawn where chekka goes
