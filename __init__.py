"""ComfyUI entry: this repository is also a custom-node pack (clone it into ComfyUI/custom_nodes/).

The WebUI never imports this file (it loads scripts/). ComfyUI imports it as a package, and only then are
its modules used; imported any other way (a test runner collecting the repository), it exports no nodes.
"""

try:
    import folder_paths  # noqa: F401  (ComfyUI's; importable only inside ComfyUI)
except ImportError:
    folder_paths = None

if folder_paths is not None and __package__:
    from .perfusion.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .perfusion.comfy.nodes import register_folder

    register_folder()
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
