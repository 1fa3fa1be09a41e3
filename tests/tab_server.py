"""The Perfusion training tab served standalone: the WebUI stand-in with the tiny model, started the way
webui.py starts the UI (scripts injected into gradio's page, create_ui, queue, launch, progress route).

    PYTHONPATH=. .venv/bin/python tests/tab_server.py [PORT [CONCEPTS_DIR [COVARIANCE_PROMPTS]]]
    PYTHONPATH=.venv-gradio4:. .venv/bin/python tests/tab_server.py ...   # on Gradio 4 (Forge, Neo)

then open http://127.0.0.1:PORT.
"""

from __future__ import annotations

import os
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import webui_host as host  # noqa: E402
from modules import progress, ui, ui_gradio_extensions  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(port: int = 0):
    """Load the extension and the tiny model, serve the UI; returns (demo, url). demo.close() stops it."""
    host.load_extension()
    host.load_model()
    ui_gradio_extensions.reload_javascript()
    demo = ui.create_ui()
    demo.queue(64)
    app, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=port or free_port(), prevent_thread_lock=True, quiet=True
    )
    progress.setup_progress_api(app)
    return demo, url


if __name__ == "__main__":
    from modules import shared

    port, concepts, prompts = (sys.argv[1:] + [None] * 3)[:3]
    if concepts:
        shared.opts.data["perfusion_dir"] = concepts
    if prompts:
        shared.opts.data["perfusion_covariance_prompts"] = int(prompts)
    import gradio

    demo, url = launch(int(port or 7870))
    print(f"serving the Perfusion tab on gradio {gradio.__version__} at {url}", flush=True)
    demo.block_thread()
