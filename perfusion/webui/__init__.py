"""The WebUI side of sd-webui-perfusion (imports the WebUI's `modules`; the engine in perfusion/ does not).

tags/library: pure; host: where A1111 and Forge differ; network: the `perfusion` extra network;
script: the gate accordion; page: the cards; infotext, api, settings: what their names say.
"""
