"""CI smoke run of the main job on the committed mini model (3 training steps, 3 sampling steps)."""

from __future__ import annotations

import hashlib

from PIL import Image

import perfusion
from perfusion.world import model as mini
from perfusion.world.w2 import demo


def test_weights_are_committed_with_their_config_and_hash():
    meta = mini.weights_meta()
    assert meta["steps"] >= 1000 and meta["config"]["unet"]["context_dim"] == 64
    assert meta["config"]["train"]["steps"] == meta["steps"]
    assert mini.WEIGHTS.stat().st_size <= 20 * 2**20
    digest, name = mini.WEIGHTS.with_suffix(".sha256").read_text().split()
    assert name == mini.WEIGHTS.name and hashlib.sha256(mini.WEIGHTS.read_bytes()).hexdigest() == digest


def test_world2_weights_are_committed_small_with_their_config_and_hash():
    path = mini.WEIGHTS.with_name("mini2.safetensors")
    meta = mini.weights_meta(path)
    assert meta["steps"] >= 12000 and meta["config"]["train"]["world"] == 2
    assert meta["config"]["text"]["max_position_embeddings"] == 48
    assert path.stat().st_size <= 30 * 2**20
    digest, name = path.with_suffix(".sha256").read_text().split()
    assert name == path.name and hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_demo_quick_run_writes_concepts_and_a_contact_sheet(tmp_path, capsys):
    from perfusion import demo as main_job

    assert main_job.main is demo.main  # `./dev.sh demo` runs world 2's
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "contact sheet:" in out
    sheet = Image.open(tmp_path / "contact-sheet.png")
    assert sheet.width > 500 and sheet.height > 900
    for token in demo.DEMO:
        c = perfusion.load_concept(tmp_path / "concepts" / f"{token}.safetensors")
        assert c.steps == 3 and c.context_dim == 64 and c.base_model_hash and c.lock == "local"
        assert len(list((tmp_path / "instances" / token).glob("*-?.png"))) == 5


def test_world2_accuracy_lists_each_one_object_miss_with_what_was_read(capsys):
    from perfusion.world.w2 import accuracy

    assert accuracy.main(["--scenes", "8", "--steps", "8", "--misses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line[:32].strip(): line[32:] for line in lines if not line.startswith("miss ")}
    one = int(table["every attribute (one object)"].split("n=")[1].rstrip(")"))
    right = float(table["every attribute (one object)"].split("%")[0]) / 100
    misses = [line for line in lines if line.startswith("miss ")]
    assert one > 0 and len(misses) == round(one * (1 - right))
    scored = {"shape", "colour", "pattern", "size", "position", "background"}
    for line in misses:  # each names, for a scored attribute, what was asked and what was read
        said = line.split("': ", 1)[1].split(", ")
        assert said and all(part.split()[0] in scored and " -> " in part for part in said), line
    assert float(table["background"].split("%")[0]) >= 90  # the committed model follows captions
