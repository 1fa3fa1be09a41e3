"""The "Perfusion" extra-networks page: one card per concept file, and its user-metadata editor."""

from __future__ import annotations

import os
from typing import Any, Optional

from modules import ui_extra_networks, ui_extra_networks_user_metadata

from ..concept import ConceptError
from . import host, network
from .log import log
from .state import library
from .tags import format_tag


def concept_metadata(entry) -> dict:
    """What the card's metadata view shows (read from the file's header; an unusable file says why under "error";
    the sha256 once it is known)."""
    try:
        c = library().peek(entry)
    except ConceptError as e:
        return {"error": str(e)}
    problem = network.problem_of(entry)
    known = entry.known_sha256
    return {
        **({"error": problem} if problem else {}),
        "token": c.token,
        "superclass": c.superclass,
        "method": c.method,
        "architecture": c.arch,
        "context width": c.context_dim,
        "layers": len(c.values),
        "locked keys stored": bool(c.keys),
        "base model hash": c.base_model_hash,
        "clip skip": c.clip_skip,
        "training steps": c.steps,
        "trained gate": f"beta {c.train_beta:g}, tau {c.train_tau:g}",
        "suggested gate": f"beta {c.beta:g}, tau {c.tau:g}",
        "created": c.created,
        **({"sha256": known} if known else {}),
    }


class PerfusionPage(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Perfusion")

    def refresh(self) -> None:
        library().refresh()

    def allowed_directories_for_previews(self) -> list[str]:
        return [str(host.concepts_folder())]

    def create_item(self, name: str, index: Optional[int] = None, enable_filter: bool = True) -> Optional[dict]:
        entry = library().find(name)
        if entry is None:
            return None
        path = os.path.splitext(str(entry.path))[0]
        meta = concept_metadata(entry)
        prefs = host.card_preferences(entry.path)
        tau = prefs.get("tau")
        if tau is None:
            tau = host.option("tau") if "error" in meta else library().peek(entry).tau  # peeked: cached
        token = meta.get("token", "")
        prompt = ui_extra_networks.quote_js(format_tag(entry.name, tau) + (f" {token}" if token else ""))
        description = self.find_description(path)
        if "error" in meta:  # marked before anyone generates with it; the metadata view has the whole reason
            description = f"Unusable: {meta['error']}" + (f"\n{description}" if description else "")
        shorthash = entry.known_sha256[:12]
        item = {
            "name": entry.name,
            "filename": str(entry.path),
            "shorthash": shorthash,
            "preview": self.find_preview(path),
            "description": description,
            "search_terms": [
                self.search_terms_from_path(str(entry.path)),
                token,
                meta.get("superclass", ""),
                shorthash,
            ]
            + (["unusable"] if "error" in meta else []),
            "local_preview": f"{path}.{host.webui_option('samples_format', 'png')}",
            "metadata": meta,
            "sort_keys": {"default": index if index is not None else 0, **self.get_sort_keys(str(entry.path))},
            "prompt": prompt,
        }
        return item

    def list_items(self):
        lib = library()
        lib.refresh()
        for problem in lib.clashes:
            log.warning(problem)
        for index, name in enumerate(sorted(lib.entries, key=str.lower)):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def create_user_metadata_editor(self, ui, tabname):
        return PerfusionUserMetadataEditor(ui, tabname, self)


class PerfusionUserMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    """The card's edit dialog: description and notes (the WebUI's), plus preferred tau and beta, which
    apply whenever a tag of this concept gives none."""

    def save_user_metadata(
        self, name: str, desc: str, notes: str, preferred_tau: Any = None, preferred_beta: Any = None
    ) -> None:
        meta = self.get_user_metadata(name)
        meta.update(description=desc, notes=notes)
        for key, value in (("preferred_tau", preferred_tau), ("preferred_beta", preferred_beta)):
            if value in (None, ""):
                meta.pop(key, None)
            else:
                meta[key] = float(value)
        self.write_user_metadata(name, meta)

    def create_editor(self):
        import gradio as gr

        self.create_default_editor_elems()
        self.preferred_tau = gr.Number(
            label="Preferred tau (used when a tag gives none)", precision=3, elem_id=f"{self.id_part}_perfusion_tau"
        )
        self.preferred_beta = gr.Number(
            label="Preferred beta (used when a tag gives none)", precision=3, elem_id=f"{self.id_part}_perfusion_beta"
        )
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.create_default_buttons()
        viewed = [
            self.edit_name,
            self.edit_description,
            self.html_filedata,
            self.html_preview,
            self.edit_notes,
            self.preferred_tau,
            self.preferred_beta,
        ]
        self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=viewed).then(
            fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box]
        )
        self.setup_save_handler(
            self.button_save,
            self.save_user_metadata,
            [self.edit_description, self.edit_notes, self.preferred_tau, self.preferred_beta],
        )

    def get_metadata_table(self, name: str) -> list:
        item = self.page.items.get(name, {})
        extra = [(f"{k.capitalize()}: ", v) for k, v in (item.get("metadata") or {}).items() if k != "sha256"]
        return super().get_metadata_table(name) + extra

    def put_values_into_components(self, name: str):
        meta = self.get_user_metadata(name)
        base = super().put_values_into_components(name)
        return [*base[:4], meta.get("notes", ""), meta.get("preferred_tau"), meta.get("preferred_beta")]
