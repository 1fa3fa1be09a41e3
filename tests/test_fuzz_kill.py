"""SIGKILL at random points: a save leaves the old file or the new one, never a torn one; a training run
killed mid-way resumes from its checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from concepts import SD1_LAYERS, make_concept, random_covariance
from safetensors.torch import save as save_bytes

from perfusion import load_concept
from perfusion.concept import _metadata, _tensors
from perfusion.files import atomic_write

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork and signals")


def _kill_while_writing(path: Path, versions: list[bytes], rounds: int, seed: int) -> list[bytes]:
    """Fork a child that rewrites `path` with the versions in turn (as the savers do, through atomic_write),
    SIGKILL it after a random delay, and return what the file holds after each kill."""
    rng, seen = random.Random(seed), []
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:  # the child: pure-Python I/O only (no torch threads after fork)
            try:
                k = 0
                while True:
                    atomic_write(path, versions[k % len(versions)])
                    k += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.append(path.read_bytes())
    return seen


def test_sigkill_during_a_concept_save_never_tears_the_file(tmp_path):
    versions = []
    for seed in (1, 2):  # an SD1-sized concept in fp32 (~100 KB): the bytes save_concept writes
        c = make_concept(SD1_LAYERS, 768, random_covariance(768, seed), seed=seed, arch="sd1")
        versions.append(save_bytes({k: v.float().contiguous() for k, v in _tensors(c).items()}, metadata=_metadata(c)))
    path = tmp_path / "hugsy.safetensors"
    atomic_write(path, versions[0])
    seen = _kill_while_writing(path, versions, rounds=30, seed=3)
    assert all(s in versions for s in seen)
    assert load_concept(path).token == "hugsy"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["hugsy.safetensors"]


def test_sigkill_during_a_checkpoint_sized_write_never_tears_the_file(tmp_path):
    versions = [bytes([k]) * (8 * 2**20) for k in (1, 2)]  # 8 MB: most kills land mid-write
    path = tmp_path / "hugsy.resume.safetensors"
    atomic_write(path, versions[0])
    seen = _kill_while_writing(path, versions, rounds=30, seed=4)
    assert all(s in versions for s in seen) and len(seen) == 30


def test_sigkill_during_a_preset_save_never_tears_the_file(tmp_path):
    import json

    form = dict(name="hugsy", token="hugsy", superclass="teddy", folder="/photos", preview_prompt="x" * 50_000)
    versions = [
        json.dumps({**form, "steps": k}, indent=2).encode()  # as save_preset writes (a long prompt)
        for k in (100, 200)
    ]
    path = tmp_path / "teddy.json"
    atomic_write(path, versions[0])
    seen = _kill_while_writing(path, versions, rounds=30, seed=6)
    assert all(s in versions for s in seen)
    assert json.loads(path.read_bytes())["steps"] in (100, 200)


TRAIN = """
import sys, time
sys.path.insert(0, {tests!r})
from tiny import pattern_images, tiny_adapter, tiny_covariance
from perfusion.train import TrainConfig, Trainer
adapter = tiny_adapter("v")
cfg = TrainConfig(name="hugsy", token="hugsy", superclass="toy", steps=40, batch_size=2, grad_accum=1, seed=7,
                  save_every=1)
slow = lambda: time.sleep(0.05) or False  # leaves time to be killed between steps and during saves
Trainer(adapter, tiny_covariance(adapter), cfg, pattern_images(3), None, {work!r}, {out!r}).run(should_stop=slow)
"""


def _checkpoint_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


def test_sigkill_during_training_then_resume(tmp_path):
    from tiny import pattern_images, tiny_adapter, tiny_covariance

    from perfusion.train import TrainConfig, Trainer

    work, out = tmp_path / "work", tmp_path / "hugsy.safetensors"
    script = TRAIN.format(tests=str(Path(__file__).parent), work=str(work), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = work / "hugsy.resume.safetensors"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if checkpoint.exists() and _checkpoint_step(checkpoint) >= 3:
            break
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    time.sleep(random.Random(5).uniform(0, 0.2))
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = _checkpoint_step(checkpoint)  # the checkpoint is whole, whenever the kill came
    assert 3 <= killed_at < 40 and not out.exists()
    adapter = tiny_adapter("v")
    cfg = TrainConfig(
        name="hugsy", token="hugsy", superclass="toy", steps=40, batch_size=2, grad_accum=1, seed=7, save_every=1
    )
    result = Trainer(adapter, tiny_covariance(adapter), cfg, pattern_images(3), None, work, out).run(resume=True)
    assert result.step == 40 and not result.interrupted and all(torch.isfinite(torch.tensor(result.losses)))
    assert load_concept(out).steps == 40
