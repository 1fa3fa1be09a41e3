"""modules/paths.py (the real one also locates ldm/sgm/k-diffusion and puts them on sys.path: left out)."""
import sys

from modules.paths_internal import models_path, script_path, data_path, extensions_dir, extensions_builtin_dir, cwd  # noqa: F401

if script_path not in sys.path:
    sys.path.insert(0, script_path)
