"""modules/textual_inversion/textual_inversion.py: Embedding and EmbeddingDatabase. Reading embedding files
from the folders and the training code are left out; the clear-and-reload behaviour is kept: the DB is
emptied after every model load and whenever an embeddings folder's mtime changes (checked at the start of
every generation), so extensions must re-register their vectors inside activate()."""
import os

from modules import shared


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec  # tensor [n, dim], or for SDXL {"clip_l": [n, 768], "clip_g": [n, 1280]}
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.cached_checksum = None
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename = None
        self.hash = None
        self.shorthash = None

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]


class DirWithTextualInversionEmbeddings:
    def __init__(self, path):
        self.path = path
        self.mtime = None

    def has_changed(self):
        if not os.path.isdir(self.path):
            return False
        mt = os.path.getmtime(self.path)
        return self.mtime is None or mt > self.mtime

    def update(self):
        if os.path.isdir(self.path):
            self.mtime = os.path.getmtime(self.path)


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1
        self.embedding_dirs = {}

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        """embedding None unregisters `name`; the name is tokenized with model.cond_stage_model.tokenize"""
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        self.ids_lookup.setdefault(first_id, [])
        lookup = [x for x in self.ids_lookup[first_id] if x[1].name != name] if name in self.word_embeddings else self.ids_lookup[first_id]
        if embedding is not None:
            lookup += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if len(self.ids_lookup[first_id]) == 0:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def get_expected_shape(self):
        if shared.sd_model is None:
            return -1
        return shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1).shape[1]

    def load_textual_inversion_embeddings(self, force_reload=False):
        if not force_reload and not any(embdir.has_changed() for embdir in self.embedding_dirs.values()):
            return
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.expected_shape = self.get_expected_shape()
        for embdir in self.embedding_dirs.values():
            embdir.update()  # files are not read by the stand-in

    def find_embedding_at_position(self, tokens, offset):
        possible_matches = self.ids_lookup.get(tokens[offset], None)
        if possible_matches is None:
            return None, None
        for ids, embedding in possible_matches:
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
