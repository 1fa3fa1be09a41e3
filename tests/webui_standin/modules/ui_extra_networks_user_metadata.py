"""modules/ui_extra_networks_user_metadata.py: UserMetadataEditor without its gradio widgets. User metadata
lives in <file without extension>.json beside the network file."""
import json
import os.path


class UserMetadataEditor:
    def __init__(self, ui, tabname, page):
        self.ui = ui
        self.tabname = tabname
        self.page = page
        self.id_part = f"{self.tabname}_{self.page.extra_networks_tabname}_edit_user_metadata"

    def get_user_metadata(self, name):
        item = self.page.items.get(name, {})
        user_metadata = item.get('user_metadata', None)
        if not user_metadata:
            user_metadata = {'description': item.get('description', '')}
            item['user_metadata'] = user_metadata
        return user_metadata

    def create_extra_default_items_in_left_column(self):
        pass

    def write_user_metadata(self, name, metadata):
        item = self.page.items.get(name, {})
        metadata_path = os.path.splitext(item.get("filename", None))[0] + '.json'
        with open(metadata_path, "w", encoding="utf8") as file:
            json.dump(metadata, file, indent=4, ensure_ascii=False)
        self.page.lister.update_file_entry(metadata_path)

    def save_user_metadata(self, name, desc, notes):
        user_metadata = self.get_user_metadata(name)
        user_metadata["description"] = desc
        user_metadata["notes"] = notes
        self.write_user_metadata(name, user_metadata)
