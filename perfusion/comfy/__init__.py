"""ComfyUI layer: Perfusion concepts as custom nodes over the same engine.

Nothing here imports ComfyUI at import time; its modules (`folder_paths`) are imported inside the
functions ComfyUI calls once it has loaded the pack (the repository root's `__init__.py`).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
