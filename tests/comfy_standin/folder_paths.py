"""Stand-in of ComfyUI's folder_paths: named model folders and their files."""

from __future__ import annotations

import os

models_dir = os.path.join(os.environ.get("COMFY_STANDIN_BASE", os.getcwd()), "models")
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def get_filename_list(folder_name: str) -> list[str]:
    paths, extensions = folder_names_and_paths[folder_name]
    found = set()
    for base in paths:
        for root, _, files in os.walk(base, followlinks=True):
            for f in files:
                if not extensions or os.path.splitext(f)[1].lower() in extensions:
                    found.add(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    if folder_name not in folder_names_and_paths:
        return None
    for base in folder_names_and_paths[folder_name][0]:
        path = os.path.join(base, os.path.relpath(os.path.join("/", filename), "/"))
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path
