"""ComfyUI entry: this repository is also a custom-node pack (clone it into ComfyUI/custom_nodes/).

The WebUI never imports this file (it loads scripts/); ComfyUI does, and only then are its modules imported.
"""

from .perfusion.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .perfusion.comfy.nodes import register_folder

register_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
