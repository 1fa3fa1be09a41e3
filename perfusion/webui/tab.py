"""The "Perfusion" training tab (on_ui_tabs): the form, Train / Interrupt / Resume, progress and previews.

Widgets only; what the buttons do lives in perfusion/webui/training.py. Training goes through the
WebUI's job queue (wrap_gradio_gpu_call), so generation waits while it runs, the progress bar shows
step, ETA and loss, and previews appear live (shared.state.assign_current_image).
"""

from __future__ import annotations

import html
from dataclasses import asdict, fields
from typing import Any

import torch
from modules import devices

from ..generate import generate
from ..hooks import Activation
from ..options import ASPECTS, LR_SCHEDULES, METHODS, TRAIN_LOCKS
from . import host, training
from .adapter import adapter_for
from .plot import loss_html
from .training import MASK_SOURCES, TrainForm

FIELDS = [f.name for f in fields(TrainForm)]


def preview_prompts(form: TrainForm) -> list[str]:
    """The preview prompts: one per line of the field, else 'a photo of TOKEN'."""
    return [line.strip() for line in form.preview_prompt.splitlines() if line.strip()] or [f"a photo of {form.token}"]


def preview(form: TrainForm):
    """The trainer's preview callback (step 0, every N steps, the end): one image per preview prompt with the
    training edit on, side by side as the live preview and saved as the run's sample grid (returned)."""

    def show(concept, step: int) -> Any:
        prompts = preview_prompts(form)
        adapter = adapter_for(host.sd_model(), int(form.resolution))
        with torch.no_grad(), host.vae_on(host.sd_model(), devices.device):
            images = generate(
                adapter,
                prompts,
                [Activation(concept, form.preview_beta, form.preview_tau)],
                latent_shape=adapter.latent_shape(form.resolution),
                seed=step,
                steps=20,
                guidance=7.0,
            )
        from PIL import Image

        row = torch.cat(list(images.float().clamp(-1, 1)), dim=-1)  # [3, R, n R]
        pixels = ((row + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        picture = Image.fromarray(pixels)
        samples = training.work_dir(form) / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        picture.save(samples / f"{form.name}-{step:05d}.png")
        host.job_state().assign_current_image(picture)
        return picture

    return show


def run(task_id: str, *values: Any) -> tuple[str, str]:
    """Train button (through wrap_gradio_gpu_call): returns (result HTML, problems HTML)."""
    form = TrainForm(**dict(zip(FIELDS, values)))
    status = training.train(form, preview(form) if form.preview_every else None)
    if status.state == "failed":
        return "", "<br>".join(html.escape(line) for line in status.message.splitlines())
    curve = loss_html(training.work_dir(form) / f"{form.name}.loss.csv")
    return html.escape(status.message) + "<br>Refresh the Perfusion cards to use it.<br>" + curve + report_html(
        status.report
    ), ""


def report_html(report) -> str:
    """The overfitting report as a small table (docs/overfitting-report.md explains the numbers)."""
    if not report:
        return ""
    rows = "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td>{v:.4g}</td></tr>" for k, v in report.items())
    return (
        f"<p>Overfitting report (drift: change on unrelated prompts; narrowness: W2 of class samples with the "
        f"concept on vs. off, against the baseline of two base sets):</p><table>{rows}</table>"
    )


def check_only(*values: Any) -> str:
    """Check button (in the generation queue: it may run the model): problems, the dataset's summary and,
    when ready, the usable images with the masks training will use (the part outside a mask dimmed)."""
    form = TrainForm(**dict(zip(FIELDS, values)))
    problems, dataset = training.check(form, load=True)
    lines = problems or ["Ready to train."]
    if dataset is not None:
        lines.append(dataset.summary())
    text = "<br>".join(html.escape(line).replace("\n", "<br>") for line in lines)
    if problems or dataset is None:
        return text
    return text + gallery_html(training.mask_previews(form, dataset))


def gallery_html(previews: list[tuple[str, str, Any]], side: int = 128) -> str:
    """Thumbnails (the longer side `side` px, each photo's shape kept) with captions as inline PNGs (the same HTML
    on Gradio 3 and 4)."""
    import base64
    import io

    figures = []
    for name, where, picture in previews:
        buffer = io.BytesIO()
        scale = side / max(picture.size)
        picture.resize((round(picture.width * scale), round(picture.height * scale))).save(buffer, format="png")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(name)}<br>mask: {html.escape(where)}</figcaption></figure>"
        )
    return f'<div class="perfusion-check-gallery">{"".join(figures)}</div>'


def form_widgets(gr: Any, d: TrainForm) -> dict[str, Any]:
    """One widget per TrainForm field, laid out as the tab shows them, keyed and ordered by field."""
    w: dict[str, Any] = {}
    with gr.Group():  # the concept
        with gr.Row():
            w["name"] = gr.Textbox(label="Concept name (file and tag)", elem_id="perfusion_train_name")
            w["token"] = gr.Textbox(label="Token word (write it in prompts)", elem_id="perfusion_train_token")
            w["superclass"] = gr.Textbox(
                label="Superclass word (one token, e.g. teddy)", elem_id="perfusion_train_superclass"
            )
    with gr.Group():  # the images
        with gr.Row():
            w["folder"] = gr.Textbox(label="Dataset folder (1-10 photos)", elem_id="perfusion_train_folder", scale=3)
            w["mask_source"] = gr.Dropdown(
                list(MASK_SOURCES), value=d.mask_source, label="Masks (auto: files/alpha, else the model's attention)"
            )
            w["aspect"] = gr.Dropdown(
                list(ASPECTS), value=d.aspect, label="Aspect (buckets: photos keep their shape; square: centre crop)"
            )
    with gr.Row():  # the run
        w["steps"] = gr.Number(value=d.steps, precision=0, label="Steps")
        w["batch_size"] = gr.Number(value=d.batch_size, precision=0, label="Batch size")
        w["grad_accum"] = gr.Number(value=d.grad_accum, precision=0, label="Gradient accumulation")
        w["resolution"] = gr.Number(value=d.resolution, precision=0, label="Resolution")
    gr.Markdown(
        "Effective batch = batch size x accumulation. The paper trains with 16; the default 1 x 16 needs the "
        "memory of one image (raise the batch size and lower the accumulation on a large card: faster, the same)."
    )
    with gr.Row():
        w["lr_values"] = gr.Number(value=d.lr_values, label="Learning rate (values)")
        w["lr_embedding"] = gr.Number(value=d.lr_embedding, label="Learning rate (embedding)")
        w["existing"] = gr.Radio(list(training.EXISTING), value=d.existing, label="If the concept exists")
    with gr.Row():  # previews, snapshots and the report
        w["save_every"] = gr.Number(value=d.save_every, precision=0, label="Save every N steps")
        w["preview_every"] = gr.Number(value=d.preview_every, precision=0, label="Preview every N steps")
        w["report_samples"] = gr.Number(value=d.report_samples, precision=0, label="Overfitting report: images per set")
    w["preview_prompt"] = gr.Textbox(
        label="Preview prompts, one per line (empty: 'a photo of TOKEN'); also saved as sample grids in the run's folder",
        value=d.preview_prompt,
        lines=2,
    )
    with gr.Accordion("Advanced: method, schedule, gates, templates", open=False):
        with gr.Row():
            w["method"] = gr.Radio(list(METHODS), value=d.method, label="Method")
            w["lr_schedule"] = gr.Dropdown(list(LR_SCHEDULES), value=d.lr_schedule, label="Learning-rate schedule")
            w["warmup_steps"] = gr.Number(value=d.warmup_steps, precision=0, label="Warm-up steps")
            w["flip"] = gr.Checkbox(value=d.flip, label="Flip")
        with gr.Row():
            w["train_beta"] = gr.Number(value=d.train_beta, label="Train gate beta")
            w["train_tau"] = gr.Number(value=d.train_tau, label="Train gate tau")
            w["lock"] = gr.Radio(
                list(TRAIN_LOCKS), value=d.lock, label="Key lock while training (hard: the values carry the look)"
            )
            w["preview_beta"] = gr.Number(value=d.preview_beta, label="Preview beta")
            w["preview_tau"] = gr.Number(value=d.preview_tau, label="Preview tau")
        w["templates_file"] = gr.Textbox(label="Templates file (empty: built-in)", value=d.templates_file)
    with gr.Accordion("Memory", open=False):
        w["gradient_checkpointing"] = gr.Checkbox(
            value=d.gradient_checkpointing, label="Gradient checkpointing (less VRAM, about 30 % slower)"
        )
    missing, extra = sorted(set(FIELDS) - set(w)), sorted(set(w) - set(FIELDS))
    if missing or extra:  # a field added to TrainForm needs its widget here (and the reverse)
        raise RuntimeError(f"training tab out of step with TrainForm: no widget for {missing}, unknown {extra}")
    return {name: w[name] for name in FIELDS}


def create_tab():
    """on_ui_tabs callback (every host: A1111 and reForge on Gradio 3, Forge and Neo on Gradio 4)."""
    import gradio as gr
    from modules.call_queue import wrap_gradio_gpu_call, wrap_queued_call

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                widgets = form_widgets(gr, TrainForm())
                with gr.Row():
                    preset_name = gr.Textbox(label="Preset name")
                    save_preset = gr.Button("Save preset")
                    load_preset = gr.Button("Load preset")
                with gr.Row():
                    check = gr.Button("Check", elem_id="perfusion_train_check")
                    interrupt = gr.Button("Interrupt", elem_id="perfusion_train_interrupt")
                    start = gr.Button("Train", variant="primary", elem_id="perfusion_train_start")
            with gr.Column():
                gr.HTML(elem_id="perfusion_train_progress")  # javascript/ draws the progress bar here
                gallery = gr.HTML(elem_id="perfusion_train_output")
                problems = gr.HTML(elem_id="perfusion_train_error")
        form = list(widgets.values())  # in TrainForm's field order: the handlers zip values with FIELDS
        task_id = gr.Textbox(visible=False)
        check.click(fn=wrap_queued_call(check_only), inputs=form, outputs=[problems])
        interrupt.click(fn=lambda: host.job_state().interrupt(), inputs=[], outputs=[])
        start.click(
            fn=wrap_gradio_gpu_call(run, extra_outputs=[""]),
            **{"_js" if gr.__version__.startswith("3.") else "js": "perfusion_start_training"},  # Gradio 4 renamed it
            inputs=[task_id, *form],
            outputs=[gallery, problems],
        )
        save_preset.click(
            fn=lambda n, *v: f"Saved {training.save_preset(TrainForm(*v), n)}",
            inputs=[preset_name, *form],
            outputs=[problems],
        )
        load_preset.click(
            fn=lambda n: list(asdict(training.load_preset(n)).values()), inputs=[preset_name], outputs=form
        )
    return [(tab, "Perfusion", "perfusion_train")]
