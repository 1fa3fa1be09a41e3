"""Stand-in of Forge Neo's backend/text_processing/classic_engine.py (no emphasis, no comma backtracking):
prompts in chunks of 75 tokens + BOS/EOS; a registered word becomes a fix at its chunk offset, whose vectors the
token-embedding wrapper splices in at offset + 1 (gradients reach them); every encoding that used a word adds its
name to the module-level infotext record `last_extra_generation_params["TI"]`."""

from collections import namedtuple

import torch

from backend.text_processing.textual_inversion import EmbeddingDatabase

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])
last_extra_generation_params = {}


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight  # the same Parameter, registered on both modules

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        embeds = self.wrapped(input_ids)
        if not batch_fixes or not any(batch_fixes):
            return embeds
        rows = []
        for fixes, row in zip(batch_fixes, embeds):
            for offset, embedding in fixes:
                vec = embedding.vec
                vec = (vec[self.textual_inversion_key] if isinstance(vec, dict) else vec).to(embeds)
                n = min(row.shape[0] - offset - 1, vec.shape[0])
                row = torch.cat([row[: offset + 1], vec[:n], row[offset + 1 + n :]])
            rows.append(row)
        return torch.stack(rows)


class ClassicTextProcessingEngine:
    def __init__(
        self,
        text_encoder,
        tokenizer,
        embedding_key="clip_l",
        embedding_expected_shape=768,
        minimal_clip_skip=1,
        clip_skip=1,
        return_pooled=False,
        final_layer_norm=True,
    ):
        self.tokenizer = tokenizer
        self.minimal_clip_skip, self.return_pooled, self.final_layer_norm = (
            minimal_clip_skip,
            return_pooled,
            final_layer_norm,
        )
        self.embeddings = EmbeddingDatabase(lambda text: self.tokenize([text])[0], embedding_expected_shape)
        self.embedding_key = embedding_key
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.chunk_length = 75
        self.id_start, self.id_end = 49406, 49407
        table = text_encoder.transformer.text_model.embeddings
        table.token_embedding = CLIPEmbeddingForTextualInversion(table.token_embedding, self.embeddings, embedding_key)

    def tokenize(self, texts):
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] if t.strip() else [] for t in texts]

    def tokenize_line(self, line):
        tokens, chunks, chunk, position = self.tokenize([line])[0], [], PromptChunk(), 0

        def next_chunk():
            nonlocal chunk
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * (self.chunk_length - len(chunk.tokens) + 1)
            chunk.multipliers = [1.0] * len(chunk.tokens)
            chunks.append(chunk)
            chunk = PromptChunk()

        while position < len(tokens):
            if len(chunk.tokens) == self.chunk_length:
                next_chunk()
            embedding, length = self.embeddings.find_embedding_at_position(tokens, position)
            if embedding is None:
                chunk.tokens.append(tokens[position])
                position += 1
                continue
            if len(chunk.tokens) + int(embedding.vectors) > self.chunk_length:
                next_chunk()
            chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
            chunk.tokens += [0] * int(embedding.vectors)
            position += length
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks, sum(len(c.tokens) for c in chunks)

    def __call__(self, texts):
        batch = [self.tokenize_line(t)[0] for t in texts]
        used, zs, pooled = {}, [], None
        for i in range(max(len(chunks) for chunks in batch)):
            chunk = [chunks[min(i, len(chunks) - 1)] for chunks in batch]
            self.embeddings.fixes = [c.fixes for c in chunk]
            used.update({fix.embedding.name: fix.embedding for c in chunk for fix in c.fixes})
            tokens = torch.tensor([c.tokens for c in chunk])
            out = self.text_encoder.transformer(tokens, output_hidden_states=True)
            z = out.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
            if self.final_layer_norm:
                z = self.text_encoder.transformer.text_model.final_layer_norm(z)
            if pooled is None and self.return_pooled:
                pooled = out.text_embeds  # the projected EOS row of the first chunk
            zs.append(z)
        if used:
            names = ", ".join(used)
            record = last_extra_generation_params
            record["TI"] = f"{record['TI']}, {names}" if "TI" in record else names
        return (torch.hstack(zs), pooled) if self.return_pooled else torch.hstack(zs)
