"""The training tab's logic in the WebUI stand-in, on the tiny model: checks, a run, interrupt/resume, presets."""

import re

import numpy as np
import pytest
import torch
import webui_host as host
from modules import devices, errors, shared, ui_extra_networks
from PIL import Image

from perfusion import load_concept
from perfusion.webui import host as host_layer
from perfusion.webui import tab, training
from perfusion.webui.adapter import WebUIAdapter
from perfusion.webui.training import TrainForm


@pytest.fixture(scope="module")
def webui():
    host.load_extension()
    model = host.load_model()
    yield model
    host.unload_extension()


@pytest.fixture
def env(webui, tmp_path, monkeypatch):
    host.reset()
    concepts, photos = tmp_path / "concepts", host.write_photos(tmp_path / "photos")
    shared.opts.data["perfusion_dir"] = str(concepts)
    shared.opts.data["perfusion_covariance_prompts"] = 128
    shared.state.interrupted = False
    yield concepts, photos
    shared.opts.data.pop("perfusion_covariance_prompts", None)
    shared.state.interrupted = False
    assert errors.exception_records == []


def form(photos, **kw):
    base = dict(
        name="hugsy",
        token="hugsy",
        superclass="teddy",
        folder=str(photos),
        steps=4,
        batch_size=2,
        grad_accum=1,
        resolution=64,
        save_every=2,
        preview_every=0,
        mask_source="none",
        report_samples=0,
    )
    return TrainForm(**{**base, **kw})


def test_a_short_run_gives_a_concept_with_a_card(env):
    concepts, photos = env
    result = training.train(form(photos, report_samples=2))
    assert result.state == "done" and result.step == 4, result.message
    assert set(result.report) == {"drift_mse", "drift_relative", "narrowness_w2", "baseline_w2", "samples"}
    assert result.report["samples"] == 2 and result.report["drift_mse"] > 0
    concept = load_concept(concepts / "hugsy.safetensors")
    assert concept.token == "hugsy" and concept.superclass == "teddy" and concept.steps == 4
    page = next(p for p in ui_extra_networks.extra_pages if p.title == "Perfusion")
    assert [item["name"] for item in page.list_items()] == ["hugsy"]
    assert sorted(p.name for p in concepts.iterdir()) == ["hugsy.safetensors"]  # working data lives elsewhere
    assert (host_layer.work_folder() / "runs" / "hugsy").is_dir() and list(
        (host_layer.work_folder() / "cache").glob("*")
    )
    out = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    assert "Perfusion: hugsy" in out.infotexts[0] and out.comments == ""


@pytest.mark.parametrize("offload", [True, False])
def test_vae_in_ram_while_training_and_back_for_each_preview(env, monkeypatch, offload):
    concepts, photos = env
    monkeypatch.setattr(devices, "cpu", torch.device("cpu", 0))  # told apart from devices.device (cpu)
    monkeypatch.setitem(shared.opts.data, "unload_models_when_training", offload)
    vae = shared.sd_model.first_stage_model
    vae.moves.clear()
    run = form(photos, preview_every=2, gradient_checkpointing=True)
    result = training.train(run, tab.preview(run))
    assert result.state == "done" and result.step == 4, result.message
    preview_moves = [devices.device, torch.device("cpu")] * 3  # to the GPU for each preview (steps 0, 2, 4), back
    if offload:  # to RAM after the latents are cached, back at the end
        assert vae.moves == [devices.cpu, *preview_moves, torch.device("cpu")]
    else:
        assert vae.moves == preview_moves
    assert load_concept(concepts / "hugsy.safetensors").steps == 4
    samples = sorted(p.name for p in (training.work_dir(run) / "samples").iterdir())
    assert samples == ["hugsy-00000.png", "hugsy-00002.png", "hugsy-00004.png"]


def test_interrupt_during_the_covariance_stops_before_training(env):
    concepts, photos = env
    shared.state.interrupted = True  # pressed before the first batch of corpus prompts is done
    result = training.train(form(photos))
    assert result.state == "interrupted" and "covariance" in result.message
    assert not (concepts / "hugsy.safetensors").exists() and not list((host_layer.work_folder() / "cache").glob("*"))
    shared.state.interrupted = False
    assert training.train(form(photos)).state == "done"  # and it starts over, unharmed


def test_an_error_mid_run_leaves_the_status_failed(env, monkeypatch):
    _, photos = env

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training.Trainer, "run", broken)
    with pytest.raises(RuntimeError):
        training.train(form(photos))
    assert training.status.state == "failed" and "out of memory" in training.status.message
    from perfusion.webui import api

    training.status.loss = float("nan")
    assert api.training_status()["loss"] is None  # JSON has no NaN: the route would answer 500


@pytest.mark.parametrize("emphasis, hint", [("Original", "Emphasis mode to 'No norm'"), ("No norm", "--no-half")])
@pytest.mark.parametrize("where", ["training prompts", "every prompt"])
def test_nan_in_the_text_encoding_fails_with_what_to_change(env, monkeypatch, emphasis, hint, where):
    """NaN from the text encoder: in the training prompts only, the first step stops; in every prompt (a random or
    converted checkpoint under emphasis 'Original'), already the covariance corpus's encodings, before training and
    with the same hint (it used to fail later, as a bare Cholesky error)."""
    concepts, photos = env
    encode = WebUIAdapter.encode

    def nan_encode(self, prompts, words=None, size=None):
        context, rows = encode(self, prompts, words, size)
        hit = where == "every prompt" or any("hugsy" in p for p in prompts)
        return (context * float("nan") if hit else context), rows

    monkeypatch.setattr(WebUIAdapter, "encode", nan_encode)
    monkeypatch.setitem(shared.opts.data, "emphasis", emphasis)
    result = training.train(form(photos))
    said = "step 1: the text encoder" if where == "training prompts" else "for ordinary prompts (the covariance corpus)"
    assert result.state == "failed" and said in result.message and hint in result.message, result.message
    assert not (concepts / "hugsy.safetensors").exists()
    saved = list((concepts.parent / "concepts-training").glob("cache/*.safetensors"))
    assert len(saved) == (where == "training prompts")  # a sound covariance is kept, a NaN one never saved


def test_interrupt_saves_and_resume_continues_to_the_end(env):
    concepts, photos = env
    seen = []
    orig = training.Trainer.run

    def run(self, *a, progress=None, **kw):
        def stop_after(p):
            progress(p)
            if p.step == 2 and not seen:
                seen.append(p.step)
                shared.state.interrupted = True

        return orig(self, *a, progress=stop_after, **kw)

    training.Trainer.run = run
    try:
        first = training.train(form(photos))
    finally:
        training.Trainer.run = orig
    assert first.state == "interrupted" and first.step == 2 and (concepts / "hugsy.safetensors").exists()
    shared.state.interrupted = False
    again = training.train(form(photos))
    assert again.state == "failed" and "exists" in again.message  # 'ask' never overwrites
    resumed = training.train(form(photos, existing="resume"))
    assert resumed.state == "done" and resumed.step == 4
    assert load_concept(concepts / "hugsy.safetensors").steps == 4


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(folder="/nonexistent/photos"), "/nonexistent/photos"),
        (dict(superclass="teddy bear"), "must be exactly one"),
        (dict(name="../evil"), "no path separators"),
        (dict(name="a/b"), "no path separators"),
        (dict(token="two words"), "token word"),
        (dict(mask_source="sometimes"), "mask source"),
    ],
)
def test_bad_input_is_reported_before_any_work(env, change, message):
    concepts, photos = env
    result = training.train(form(photos, **change))
    assert result.state == "failed" and message in result.message
    assert not (concepts / "hugsy.safetensors").exists() and not (host_layer.work_folder() / "runs").exists()


def test_unreadable_and_empty_folders(env, tmp_path):
    concepts, photos = env
    (photos / "broken.png").write_bytes(b"not an image")
    problems, dataset = training.check(form(photos))
    assert problems == [] and len(dataset.samples) == 3 and "broken.png" in dataset.summary()
    empty = tmp_path / "empty"
    empty.mkdir()
    problems, _ = training.check(form(empty))
    assert any("is empty" in p for p in problems)


def test_captions_placing_the_word_need_it_in_every_caption(env, tmp_path):
    """A templates file with a line without [name] takes the word from the captions: the check names each
    caption file that lacks it, before any work; with [name] in every caption there is no problem."""
    concepts, photos = env
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of [filewords]\n")
    stems = sorted(p.stem for p in photos.glob("*.png"))
    for stem in stems:
        (photos / f"{stem}.txt").write_text("a small [name] on a table\n")
    problems, dataset = training.check(form(photos, templates_file=str(templates)))
    assert problems == [] and len(dataset.samples) == len(stems)
    (photos / f"{stems[1]}.txt").write_text("on a table\n")
    problems, _ = training.check(form(photos, templates_file=str(templates)))
    assert any(f"{stems[1]}.txt has no [name]" in p and str(templates) in p for p in problems), problems
    assert not any(f"{stems[0]}.txt" in p for p in problems)


def test_no_model_loaded(env, monkeypatch):
    concepts, photos = env
    monkeypatch.setattr(shared, "sd_model", None)
    problems, _ = training.check(form(photos))
    assert any("no model is loaded" in p for p in problems)


def test_working_data_of_earlier_versions_moves_out_of_the_concepts_folder(env):
    concepts, _ = env
    for old in (".training/hugsy", ".cache", ".presets"):
        (concepts / old).mkdir(parents=True)
    (concepts / ".presets" / "p.json").write_text("{}")
    work = host_layer.work_folder()
    assert work == concepts.parent / "concepts-training" and not list(concepts.iterdir())
    assert (work / "runs" / "hugsy").is_dir() and (work / "cache").is_dir() and (work / "presets" / "p.json").exists()


def test_presets_round_trip_and_reject_unknown_fields(env):
    concepts, photos = env
    f = form(photos, steps=123)
    path = training.save_preset(f, "teddy defaults")
    assert path.parent == host_layer.work_folder() / "presets" and training.load_preset("teddy defaults") == f
    path.write_text('{"name": "x", "colour": "red"}')
    with pytest.raises(training.TrainError, match="unknown training fields"):
        training.load_preset("teddy defaults")


def test_training_api_checks_runs_and_reports_status(env):
    fastapi = pytest.importorskip("fastapi")
    import time
    from dataclasses import asdict

    from fastapi.testclient import TestClient
    from modules import script_callbacks

    concepts, photos = env
    app = fastapi.FastAPI()
    script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert "hugsy" not in [c["name"] for c in client.get("/perfusion/v1/concepts").json()["concepts"]]
    bad = client.post("/perfusion/v1/train", json={**asdict(form(photos)), "superclass": "teddy bear"})
    assert bad.status_code == 422 and any("exactly one" in p for p in bad.json()["detail"])
    assert client.post("/perfusion/v1/train", json={"name": "x", "colour": 1}).status_code == 422
    ok = client.post("/perfusion/v1/train", json=asdict(form(photos)))
    assert ok.status_code == 200 and ok.json() == {"started": "hugsy"}
    for _ in range(600):
        status = client.get("/perfusion/v1/train/status").json()
        if status["state"] in ("done", "failed", "interrupted"):
            break
        time.sleep(0.1)
    assert status["state"] == "done" and status["step"] == 4, status
    assert (concepts / "hugsy.safetensors").exists()
    listed = client.get("/perfusion/v1/concepts").json()["concepts"]  # no refresh asked: the folder changed
    assert [c["name"] for c in listed if c["usable"]] == ["hugsy"]


def test_the_tab_has_one_widget_per_form_field_in_field_order(webui, monkeypatch):
    gr = pytest.importorskip("gradio")
    from dataclasses import fields

    defaults = TrainForm()
    with gr.Blocks():
        widgets = tab.form_widgets(gr, defaults)
    assert list(widgets) == [f.name for f in fields(TrainForm)]
    assert TrainForm(**dict(zip(tab.FIELDS, [w.value for w in widgets.values()]))) == defaults
    monkeypatch.setattr(tab, "FIELDS", [*tab.FIELDS, "new_field"])  # a field without its widget
    with gr.Blocks(), pytest.raises(RuntimeError, match="no widget for \\['new_field'\\]"):
        tab.form_widgets(gr, defaults)


def test_several_preview_prompts_make_one_row_and_the_end_is_previewed(env):
    """One preview image per prompt line, side by side; a run whose last step is not a preview step still
    shows (and saves) its end."""
    from PIL import Image

    concepts, photos = env
    run = form(photos, steps=3, preview_every=2, preview_prompt="a photo of hugsy\n\na hugsy on the moon\n")
    assert tab.preview_prompts(run) == ["a photo of hugsy", "a hugsy on the moon"]
    result = training.train(run, tab.preview(run))
    assert result.state == "done", result.message
    folder = training.work_dir(run) / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["hugsy-00000.png", "hugsy-00002.png", "hugsy-00003.png"]
    width, height = Image.open(folder / "hugsy-00003.png").size
    assert width == 2 * height


def test_the_eta_counts_this_runs_training_steps_only(env, monkeypatch):
    """The WebUI's ETA is elapsed / (job_no / job_count) - elapsed since state.time_start: the covariance phase
    before the steps and the steps a resumed run found done must not enter it."""
    import time

    concepts, photos = env
    covariance_done, seen = [], []
    encode = training.cached_covariance

    def slow_covariance(*a, **kw):
        out = encode(*a, **kw)
        time.sleep(0.3)  # a long first-time covariance
        covariance_done.append(time.time())
        return out

    monkeypatch.setattr(training, "cached_covariance", slow_covariance)
    orig = training.Trainer.run

    def run(self, *a, progress=None, **kw):
        def record(p):
            progress(p)
            seen.append((p.step, shared.state.job_no, shared.state.job_count, shared.state.time_start))
            if p.step == 1 and len(seen) == 1:
                shared.state.interrupted = True

        return orig(self, *a, progress=record, **kw)

    monkeypatch.setattr(training.Trainer, "run", run)
    assert training.train(form(photos)).step == 1
    shared.state.interrupted = False
    assert training.train(form(photos, existing="resume")).state == "done"
    first, resumed = seen[:1], seen[1:]
    assert [(s, n, c) for s, n, c, _ in first] == [(1, 1, 4)]
    assert [(s, n, c) for s, n, c, _ in resumed] == [(2, 1, 3), (3, 2, 3), (4, 3, 3)]  # 1 of 3 left, not 2 of 4
    assert first[0][3] >= covariance_done[0] and resumed[0][3] >= covariance_done[1]  # timed from the steps


def test_check_shows_each_image_with_the_mask_training_uses(env, monkeypatch):
    """An alpha-masked image shows its alpha mask, the others the model's attention on the superclass word (auto),
    computed from the same latents and seed as the trainer's; 'none' shows the images undimmed."""
    import perfusion.masks as masks_module

    concepts, photos = env
    rgba = np.zeros((72, 72, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[20:50, 20:50, 3] = 255  # the object: a square; the rest transparent
    Image.fromarray(rgba, "RGBA").save(photos / "cut.png")
    calls = []

    def spy(original):
        def attention(adapter, latents, superclass, **kw):
            calls.append((latents.clone(), superclass, kw))
            return original(adapter, latents, superclass, **kw)

        return attention

    monkeypatch.setattr(masks_module, "attention_masks", spy(masks_module.attention_masks))
    f = form(photos, mask_source="auto")
    problems, dataset = training.check(f)
    assert not problems
    shown = training.mask_previews(f, dataset)
    assert [(name, where) for name, where, _ in shown] == [
        ("bear0.png", "attention on 'teddy'"),
        ("bear1.png", "attention on 'teddy'"),
        ("bear2.png", "attention on 'teddy'"),
        ("cut.png", "mask file or alpha"),
    ]
    cut = np.asarray(shown[3][2]).astype(float)
    assert cut[35, 35].mean() == 200 and cut[5, 5].mean() < 70  # outside the alpha (white): dimmed to a quarter
    bears = [np.asarray(p).astype(float) for _, _, p in shown[:3]]
    originals = [((s.image.permute(1, 2, 0).numpy() + 1) * 127.5) for s in dataset.samples[:3]]
    assert all(np.abs(b - o).max() > 20 for b, o in zip(bears, originals))  # the attention mask dims something
    assert training.train(f).state == "done"
    (check_latents, check_word, check_kw), (train_latents, train_word, train_kw) = calls
    assert torch.equal(check_latents, train_latents) and check_word == train_word and check_kw == train_kw
    plain = training.mask_previews(form(photos, mask_source="none"), dataset)
    assert {where for _, where, _ in plain} == {"none (unmasked)"}
    assert np.abs(np.asarray(plain[0][2]).astype(float) - originals[0]).max() <= 1.0
    html = tab.gallery_html(shown)
    assert html.count('<img src="data:image/png;base64,') == 4 and "cut.png<br>mask: mask file or alpha" in html


class FakeSummaryWriter:
    """torch.utils.tensorboard.SummaryWriter's calls as the board makes them (log_dir, flush_secs; add_scalar,
    add_image with dataformats; close)."""

    made: list = []

    def __init__(self, log_dir, flush_secs=120):
        self.log_dir, self.flush_secs, self.scalars, self.images, self.closed = log_dir, flush_secs, {}, [], False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, scalar_value, global_step=None):
        self.scalars.setdefault(tag, []).append((global_step, float(scalar_value)))

    def add_image(self, tag, img_tensor, global_step=None, dataformats="CHW"):
        self.images.append((tag, global_step, img_tensor.shape, dataformats))

    def close(self):
        self.closed = True


@pytest.mark.parametrize("images", [True, False])
def test_tensorboard_logs_when_the_webuis_setting_is_on(env, monkeypatch, images):
    from perfusion.webui import board

    concepts, photos = env
    FakeSummaryWriter.made = []
    monkeypatch.setattr(board, "_summary_writer", lambda: FakeSummaryWriter)
    assert training.train(form(photos)).state == "done" and FakeSummaryWriter.made == []  # off by default
    monkeypatch.setitem(shared.opts.data, "training_enable_tensorboard", True)
    monkeypatch.setitem(shared.opts.data, "training_tensorboard_save_images", images)
    monkeypatch.setitem(shared.opts.data, "training_tensorboard_flush_every", 30)
    f = form(photos, existing="overwrite", preview_every=2, lr_schedule="linear", warmup_steps=0)
    assert training.train(f, tab.preview(f)).state == "done"
    (writer,) = FakeSummaryWriter.made
    assert writer.closed and writer.flush_secs == 30
    assert writer.log_dir == str(training.work_dir(f) / "tensorboard")
    assert [s for s, _ in writer.scalars["Loss/train"]] == [1, 2, 3, 4]
    lr = [v for _, v in writer.scalars["Learn rate/values"]]
    assert lr[0] == pytest.approx(f.lr_values) and lr[-1] == pytest.approx(f.lr_values / 4)  # linear decay to 0
    similarity = [v for _, v in writer.scalars["Gate/superclass similarity"]]
    gates = [v for _, v in writer.scalars["Gate/superclass gate"]]
    assert all(abs(v) < 5 for v in similarity) and len(set(similarity)) > 1  # the learned i* moves
    assert all(0 < g < 1 for g in gates)
    assert [(s, fmt) for _, s, _, fmt in writer.images] == ([(0, "HWC"), (2, "HWC"), (4, "HWC")] if images else [])


def test_tensorboard_missing_says_how_to_install_and_training_goes_on(env, monkeypatch, capsys):
    from perfusion.webui import board

    def missing():
        raise ImportError("TensorBoard logging requires TensorBoard version 1.15 or above")

    concepts, photos = env
    monkeypatch.setattr(board, "_summary_writer", missing)
    monkeypatch.setitem(shared.opts.data, "training_enable_tensorboard", True)
    assert training.train(form(photos)).state == "done"
    assert "pip install tensorboard" in capsys.readouterr().out


def test_the_covariance_phase_says_how_long_it_will_take(env, monkeypatch):
    """The first training on a model encodes the covariance corpus: its progress line says prompts done and the
    time left, and the second run finds it cached (no covariance phase at all)."""
    concepts, photos = env
    lines = []
    encode = training.cached_covariance

    def watched(*a, progress, **kw):
        def report(done, total):
            progress(done, total)
            lines.append(shared.state.textinfo)

        return encode(*a, progress=report, **kw)

    monkeypatch.setattr(training, "cached_covariance", watched)
    assert training.train(form(photos, steps=1)).state == "done"
    prefix = "Perfusion: text-encoding covariance (once per model and CLIP skip): "
    assert re.fullmatch(re.escape(prefix) + r"64/128 prompts, about [1-9]\d* s left", lines[0])  # after a batch
    assert lines[-1] == prefix + "128/128 prompts, about 0 s left" and len(lines) == 2
    lines.clear()
    assert training.train(form(photos, steps=1, name="again")).state == "done" and lines == []  # cached per model
    assert [training.duration_words(s) for s in (0.2, 59, 61, 3599, 3661)] == [
        "1 s",
        "59 s",
        "2 min",
        "1 h 0 min",
        "1 h 2 min",
    ]
