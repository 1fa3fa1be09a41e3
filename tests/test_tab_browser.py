"""The training tab in a real browser, on both Gradio versions the hosts run: served standalone by the WebUI
stand-in on gradio 3.41.2 (A1111, reForge; in this process) and on gradio 4.40.0 (Forge, Neo; a tab server
started with .venv-gradio4, which dev.sh installs, first on its path), driven in headless Chromium (Debian's
/usr/bin/chromium, or PERFUSION_CHROMIUM). PERFUSION_SCREENSHOT=path saves the finished tab there
(docs/images/training-tab-standin.png; Gradio 4: the same name with -gradio4)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("PERFUSION_CHROMIUM", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):  # .ci/run installs it: missing there is a broken CI, not a reason to skip
        pytest.fail(f"no Chromium at {CHROMIUM} in CI (.ci/run installs Debian's chromium)", pytrace=False)
    pytest.skip(f"no Chromium at {CHROMIUM} (apt install chromium, or set PERFUSION_CHROMIUM)", allow_module_level=True)

GRADIO4 = Path(__file__).resolve().parent.parent / ".venv-gradio4"
import tab_server  # noqa: E402
import webui_host as host  # noqa: E402
from modules import errors, shared  # noqa: E402

from perfusion import load_concept  # noqa: E402


def serve_gradio4(root: Path):
    """The tab server on Gradio 4 in its own process; returns (process, url, log path)."""
    if not (GRADIO4 / "gradio").is_dir():
        message = f"no Gradio 4 stack at {GRADIO4} (./dev.sh test installs it from requirements-gradio4.txt)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    log = root / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GRADIO4), str(GRADIO4.parent)])}
    command = [sys.executable, tab_server.__file__, str(tab_server.free_port()), str(root / "concepts"), "128"]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "serving the Perfusion tab on gradio 4." not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the Gradio 4 tab server did not start:\n{log.read_text()[-3000:]}", pytrace=False)
        time.sleep(0.2)
    return process, log.read_text().split(" at ")[-1].strip(), log


@pytest.fixture(scope="module", params=["gradio3", "gradio4"])
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    photos = host.write_photos(root / "photos")
    (photos / "notes.png").write_bytes(b"not an image")
    if request.param == "gradio3":
        shared.opts.data["perfusion_dir"] = str(root / "concepts")
        shared.opts.data["perfusion_covariance_prompts"] = 128
        demo, url = tab_server.launch()
        server_errors = lambda: errors.exception_records  # noqa: E731
    else:
        process, url, log = serve_gradio4(root)
        server_errors = lambda: [line for line in log.read_text().splitlines() if "Traceback" in line]  # noqa: E731
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page_errors = []
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        page.goto(url, wait_until="load")
        page.locator("#tab_perfusion_train").wait_for(state="attached", timeout=60000)
        yield page, root, photos, server_errors
        browser.close()
        assert page_errors == []
    if request.param == "gradio3":
        demo.close()
        host.unload_extension()
        shared.opts.data.pop("perfusion_dir", None)
        shared.opts.data.pop("perfusion_covariance_prompts", None)
    else:
        process.kill()
        process.wait()


def fill(page, form: dict) -> None:
    tab = page.locator("#tab_perfusion_train")
    for elem_id in ("name", "token", "superclass", "folder"):
        if elem_id in form:
            page.locator(f"#perfusion_train_{elem_id} textarea").fill(form[elem_id])
    for label, value in form.get("numbers", {}).items():
        tab.get_by_label(label, exact=True).fill(str(value))


def test_check_reports_problems_then_a_ready_dataset(served):
    page, _, photos, _ = served
    fill(page, {"name": "hugsy", "token": "hugsy", "superclass": "teddy bear", "folder": str(photos)})
    page.click("#perfusion_train_check")
    problems = page.locator("#perfusion_train_error").first  # gradio 3 repeats an HTML's elem_id inside
    problems.get_by_text("exactly one", exact=False).wait_for(timeout=30000)
    fill(page, {"superclass": "teddy", "numbers": {"Resolution": 64}})  # Check runs the model for the masks
    page.click("#perfusion_train_check")
    problems.get_by_text("Ready to train.").wait_for(timeout=30000)
    text = problems.inner_text()
    assert "3 usable images, 1 skipped" in text and "notes.png" in text
    thumbnails = problems.locator(".perfusion-check-gallery img")  # each usable image with its training mask
    assert thumbnails.count() == 3 and thumbnails.first.evaluate("i => i.naturalWidth") == 128
    assert text.count("mask: attention on 'teddy'") == 3


def test_train_shows_progress_previews_and_the_finished_concept(served):
    page, root, photos, server_errors = served
    fill(
        page,
        {
            "name": "hugsy",
            "token": "hugsy",
            "superclass": "teddy",
            "folder": str(photos),
            "numbers": {
                "Steps": 6,
                "Batch size": 1,
                "Gradient accumulation": 1,
                "Resolution": 64,
                "Save every N steps": 3,
                "Preview every N steps": 2,
                "Overfitting report: images per set": 2,
            },
        },
    )
    page.click("#perfusion_train_start")
    output, bars, progress_text = (
        page.locator("#perfusion_train_output").first,
        page.locator(".progressDiv .progress"),
        page.locator("#perfusion_train_progress").first,
    )
    seen, previews, deadline = set(), 0, time.monotonic() + 240
    while "Finished" not in output.inner_text() and time.monotonic() < deadline:
        for locator in (bars, progress_text):
            if locator.count():
                seen.add(locator.first.inner_text().strip())
        previews = max(previews, output.locator(".livePreview img").count())
        page.wait_for_timeout(50)
    result = output.inner_text()
    assert "Finished step 6" in result, (result, page.locator("#perfusion_train_error").first.inner_text())
    assert any("step" in s and "loss" in s for s in seen), seen  # the WebUI progress bar's textinfo
    assert previews >= 1
    assert output.locator("img").count() >= 1 and "Overfitting report" in result  # loss curve, report table
    # the progress line ends on the outcome (it used to stay on "overfitting report")
    progress_text.get_by_text("Finished step 6").wait_for(timeout=30000)
    concept = load_concept(root / "concepts" / "hugsy.safetensors")
    assert concept.steps == 6 and concept.superclass == "teddy"
    assert server_errors() == []
    shot = os.environ.get("PERFUSION_SCREENSHOT")
    page.screenshot(path=str(root / "tab.png"), full_page=True)
    if shot:
        shutil.copy(root / "tab.png", shot if "gradio3" in root.name else shot.replace(".png", "-gradio4.png"))
