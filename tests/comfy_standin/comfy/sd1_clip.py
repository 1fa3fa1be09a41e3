"""Stand-in of comfy.sd1_clip: prompt weights, the `embedding:` syntax and the encoder that places tensor tokens."""

from __future__ import annotations

import re

import torch


def parse_parentheses(string: str) -> list[str]:
    """Top-level pieces: plain text and balanced '(...)' groups."""
    out, current, depth = [], "", 0
    for ch in string:
        if ch == "(":
            if depth == 0 and current:
                out.append(current)
                current = ""
            depth += 1
            current += ch
        elif ch == ")" and depth > 0:
            depth -= 1
            current += ch
            if depth == 0:
                out.append(current)
                current = ""
        else:
            current += ch
    if current:
        out.append(current)
    return out


def token_weights(string: str, current_weight: float) -> list[tuple[str, float]]:
    """'(text:1.2)' -> [(text, 1.2)]; '(text)' multiplies by 1.1; nested groups multiply."""
    out = []
    for x in parse_parentheses(string):
        weight = current_weight
        if len(x) >= 2 and x[0] == "(" and x[-1] == ")":
            x = x[1:-1]
            colon = x.rfind(":")
            weight *= 1.1
            if colon > 0:
                try:
                    weight = float(x[colon + 1 :])
                    x = x[:colon]
                except ValueError:
                    pass
            out += token_weights(x, weight)
        else:
            out.append((x, current_weight))
    return out


class SDTokenizer:
    def __init__(
        self,
        tokenizer=None,
        max_length=77,
        pad_with_end=True,
        embedding_directory=None,
        embedding_size=768,
        embedding_key="clip_l",
    ):
        self.tokenizer = tokenizer  # a transformers CLIPTokenizer
        self.max_length = max_length
        self.start_token, self.end_token = 49406, 49407
        self.pad_token = self.end_token if pad_with_end else 0
        self.embedding_directory = embedding_directory
        self.embedding_identifier = "embedding:"
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key

    def _try_get_embedding(self, embedding_name: str):
        """(vectors or None, leftover text): no embedding files in the stand-in."""
        words = embedding_name.split()
        return None, " ".join(words[1:])

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        tokens = []
        for segment, weight in token_weights(text, 1.0):
            split = re.split(f" {self.embedding_identifier}|\n{self.embedding_identifier}", segment)
            pieces = [split[0]] + [self.embedding_identifier + s for s in split[1:]]
            for word in [p for p in pieces if p != ""]:
                if word.startswith(self.embedding_identifier) and self.embedding_directory is not None:
                    embed, leftover = self._try_get_embedding(word[len(self.embedding_identifier) :].strip("\n"))
                    if embed is not None:
                        tokens.append([(embed[x], weight) for x in range(embed.shape[0])])
                    if leftover == "":
                        continue
                    word = leftover
                tokens.append([(t, weight) for t in self.tokenizer(word)["input_ids"][1:-1]])
        batch = [(self.start_token, 1.0, 0)]
        for i, group in enumerate(tokens):
            batch.extend((t, w, i + 1) for t, w in group)
        if len(batch) > self.max_length - 1:
            raise ValueError("the stand-in encodes one 77-token chunk only")
        batch.append((self.end_token, 1.0, 0))
        batch.extend([(self.pad_token, 1.0, 0)] * (self.max_length - len(batch)))
        out = [batch]
        if not return_word_ids:
            out = [[(t, w) for t, w, _ in b] for b in out]
        return out


class SD1Tokenizer:
    def __init__(self, embedding_directory=None, clip_name="l", tokenizer=SDTokenizer, inner=None):
        self.clip_name = clip_name
        self.clip = f"clip_{clip_name}"
        setattr(self, self.clip, tokenizer(inner, embedding_directory=embedding_directory))

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {self.clip_name: getattr(self, self.clip).tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return getattr(self, self.clip).untokenize(token_weight_pair)


class SDClipModel(torch.nn.Module):
    """Encodes a batch of (token, weight) rows; tensor tokens become that row's input embedding."""

    def __init__(self, transformer, clip_name="l"):
        super().__init__()
        self.transformer = transformer  # a transformers CLIPTextModel
        self.clip_name = clip_name
        self.layer_idx = None
        self._rows = None
        transformer.get_input_embeddings().register_forward_hook(self._place)

    def set_clip_options(self, options):
        self.layer_idx = options.get("layer", self.layer_idx)

    def reset_clip_options(self):
        self.layer_idx = None

    def _place(self, module, args, out):
        if self._rows is None:
            return None
        where, rows = self._rows
        out = out.clone()
        out[where] = rows.to(out.dtype)
        return out

    def _encode(self, batches):
        ids = [
            [t if isinstance(t, int) else self_pad for t, _ in b]
            for b, self_pad in zip(batches, [49407] * len(batches))
        ]
        where = torch.tensor([[not isinstance(t, int) for t, _ in b] for b in batches])
        rows = [t for b in batches for t, _ in b if not isinstance(t, int)]
        self._rows = (where, torch.stack(rows)) if rows else None
        try:
            out = self.transformer(input_ids=torch.tensor(ids), output_hidden_states=self.layer_idx is not None)
        finally:
            self._rows = None
        return out.last_hidden_state if self.layer_idx is None else out.hidden_states[self.layer_idx]

    def encode_token_weights(self, token_weight_pairs):
        batches = token_weight_pairs[self.clip_name]
        z = self._encode(batches)
        weights = torch.tensor([[w for _, w in b] for b in batches], dtype=z.dtype)
        if (weights != 1.0).any():
            empty = self._encode([[(49406, 1.0)] + [(49407, 1.0)] * (len(batches[0]) - 1)])
            z = (z - empty) * weights[..., None] + empty
        return z, z[:, -1]
