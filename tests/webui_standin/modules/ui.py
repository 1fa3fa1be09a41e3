"""modules/ui.py: create_ui with only what extensions add: the on_ui_tabs tabs inside gr.Tabs(elem_id="tabs"),
each a TabItem with id ifid and elem_id tab_<ifid>, as the WebUI lays them out after its own tabs."""
import gradio as gr

from modules import script_callbacks


def create_ui():
    interfaces = script_callbacks.ui_tabs_callback()
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    return demo
