"""sd-webui-perfusion: the WebUI entry script. Glue only; the library is perfusion/ (engine) and
perfusion/webui/ (extra network, cards, accordion, infotext, API, settings)."""

from modules import extra_networks, script_callbacks, ui_extra_networks

from perfusion.webui import api, infotext, network, page, settings, tab, xyz
from perfusion.webui.script import PerfusionScript  # noqa: F401  (the WebUI collects Script classes from here)

settings.register()


def register_network_and_page() -> None:
    extra_networks.register_extra_network(network.PerfusionNetwork())
    ui_extra_networks.register_page(page.PerfusionPage())


script_callbacks.on_before_ui(register_network_and_page)
script_callbacks.on_before_ui(xyz.add_axes)
script_callbacks.on_ui_tabs(tab.create_tab)
script_callbacks.on_infotext_pasted(infotext.on_infotext_pasted)
script_callbacks.on_app_started(api.on_app_started)
script_callbacks.on_script_unloaded(network.unload)
