"""modules/ui_extra_networks.py: ExtraNetworksPage and the page registry. HTML templates, gradio tabs and the
thumbnail/metadata HTTP routes are left out; create_item_html() returns the card fields (KeyError on a
missing required key, as the real card rendering does)."""
import html
import os.path
import urllib.parse
from pathlib import Path

from modules import shared, ui_extra_networks_user_metadata, extra_networks, util

extra_pages = []
allowed_dirs = set()
default_allowed_preview_extensions = ["png", "jpg", "jpeg", "webp", "gif"]


def allowed_preview_extensions():
    return set(default_allowed_preview_extensions) | {shared.opts.samples_format}


def register_page(page):
    """register a page; extensions do it in on_before_ui (the list is cleared after scripts load)"""
    extra_pages.append(page)
    allowed_dirs.clear()
    allowed_dirs.update(set(sum([x.allowed_directories_for_previews() for x in extra_pages], [])))


def quote_js(s):
    s = s.replace('\\', '\\\\').replace('"', '\\"')
    return f'"{s}"'


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.metadata = {}
        self.items = {}
        self.lister = util.MassFileLister()

    def refresh(self):
        pass

    def read_user_metadata(self, item, use_cache=True):
        metadata = extra_networks.get_user_metadata(item.get("filename", None), lister=self.lister if use_cache else None)
        desc = metadata.get("description", None)
        if desc is not None:
            item["description"] = desc
        item["user_metadata"] = metadata

    def link_preview(self, filename):
        mtime, _ = self.lister.mctime(filename)
        return f"./sd_extra_networks/thumb?filename={urllib.parse.quote(filename.replace(chr(92), '/'))}&mtime={mtime}"

    def search_terms_from_path(self, filename, possible_directories=None):
        abspath = os.path.abspath(filename)
        for parentdir in (possible_directories if possible_directories is not None else self.allowed_directories_for_previews()):
            parentdir = os.path.dirname(os.path.abspath(parentdir))
            if abspath.startswith(parentdir):
                return os.path.relpath(abspath, parentdir)
        return ""

    def create_item_html(self, tabname, item, template=None):
        onclick = item.get("onclick", None)
        if onclick is None:  # prompt/negative_prompt are JavaScript expressions, pasted unquoted
            onclick = html.escape(f"cardClicked('{tabname}', {item['prompt']}, {item.get('negative_prompt', chr(39) * 2)}, "
                                  f"{str(self.allow_negative_prompt).lower()});")
        args = {
            "card_clicked": onclick, "copy_path_button": item["filename"], "description": item.get("description", "") or "",
            "local_preview": quote_js(item["local_preview"]), "name": html.escape(item["name"]), "prompt": item.get("prompt", None),
            "search_terms": " ".join(item.get("search_terms", [])), "sort_keys": item.get("sort_keys", {}),
            "tabname": tabname, "extra_networks_tabname": self.extra_networks_tabname,
        }
        return template.format(**args) if template else args

    def create_html(self, tabname, *, empty=False):
        self.lister.reset()
        self.metadata = {}
        self.items = {x["name"]: x for x in ([] if empty else self.list_items())}
        for item in self.items.values():
            if item.get("metadata"):
                self.metadata[item["name"]] = item["metadata"]
            if "user_metadata" not in item:
                self.read_user_metadata(item)
        return "".join(self.create_item_html(tabname, item, "<div class='card' onclick=\"{card_clicked}\">{name}</div>")
                       for item in self.items.values())

    def create_item(self, name, index=None):
        raise NotImplementedError()

    def list_items(self):
        raise NotImplementedError()

    def allowed_directories_for_previews(self):
        return []

    def get_sort_keys(self, path):
        pth = Path(path)
        mtime, ctime = self.lister.mctime(path)
        return {"date_created": int(mtime), "date_modified": int(ctime), "name": pth.name.lower(), "path": str(pth).lower()}

    def find_preview(self, path):
        """path WITHOUT extension; returns a thumbnail URL for path.<ext> or path.preview.<ext>, else None"""
        for file in sum([[f"{path}.{ext}", f"{path}.preview.{ext}"] for ext in allowed_preview_extensions()], []):
            if self.lister.exists(file):
                return self.link_preview(file)
        return None

    def find_embedded_preview(self, path, name, metadata):
        return None  # safetensors cover images (ssmd_cover_images) left out

    def find_description(self, path):
        for file in [f"{path}.txt", f"{path}.description.txt"]:
            if not self.lister.exists(file):
                continue
            try:
                with open(file, "r", encoding="utf-8", errors="replace") as f:
                    return f.read()
            except OSError:
                pass
        return None

    def create_user_metadata_editor(self, ui, tabname):
        return ui_extra_networks_user_metadata.UserMetadataEditor(ui, tabname, self)


def initialize():
    extra_pages.clear()


def register_default_pages():
    pass  # textual inversion, hypernetwork and checkpoint pages left out
