"""Run by the WebUI on every start: installs only what is missing (the WebUI already ships torch, numpy,
pillow, gradio and safetensors), so a normal start does nothing and takes milliseconds."""

import launch

REQUIREMENTS = {"safetensors": "safetensors>=0.3.1"}

for module, spec in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {spec}", f"sd-webui-perfusion requirement: {spec}")
