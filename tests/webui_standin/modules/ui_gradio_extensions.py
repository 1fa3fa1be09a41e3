"""modules/ui_gradio_extensions.py: every page gradio serves gets the WebUI's scripts in <head> (here the
stand-in's script.js/progressbar.js subset, then each active extension's javascript/*.js) and the
extensions' style.css before </body>, by replacing gradio's TemplateResponse."""
import os

import gradio as gr

from modules import extensions, shared

STANDIN_JS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "javascript", "standin.js")


def javascript_html():
    files = [STANDIN_JS] + [f.path for ext in extensions.active() for f in ext.list_files("javascript", ".js")]
    return "".join(f'<script type="text/javascript">{open(path, encoding="utf8").read()}</script>\n' for path in files)


def css_html():
    sheets = [os.path.join(ext.path, "style.css") for ext in extensions.active()]
    return "".join(f"<style>{open(path, encoding='utf8').read()}</style>" for path in sheets if os.path.isfile(path))


def reload_javascript():
    js, css = javascript_html(), css_html()

    def template_response(*args, **kwargs):
        res = shared.GradioTemplateResponseOriginal(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{js}</head>".encode("utf8"))
        res.body = res.body.replace(b"</body>", f"{css}</body>".encode("utf8"))
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response


if not hasattr(shared, "GradioTemplateResponseOriginal"):
    shared.GradioTemplateResponseOriginal = gr.routes.templates.TemplateResponse
