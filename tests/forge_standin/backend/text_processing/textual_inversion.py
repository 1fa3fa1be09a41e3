"""Stand-in of Forge Neo's backend.text_processing.textual_inversion: one database per text engine."""


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec, self.name, self.step = vec, name, step
        self.shape = None
        self.vectors = 0


class EmbeddingDatabase:
    def __init__(self, tokenizer, expected_shape=-1):
        self.tokenizer = tokenizer  # text -> ids without BOS/EOS
        self.expected_shape = expected_shape
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.fixes = None  # set by the engine for the encoding under way, read (and cleared) by the token embedding

    def register_embedding_by_name(self, embedding, name):
        ids = self.tokenizer(name)
        first = ids[0]
        lookup = [x for x in self.ids_lookup.get(first, []) if x[1].name != name]
        if embedding is not None:
            lookup.append((ids, embedding))
            self.word_embeddings[name] = embedding
        else:
            self.word_embeddings.pop(name, None)
        if lookup:
            self.ids_lookup[first] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        else:
            self.ids_lookup.pop(first, None)
        return embedding

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset : offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
