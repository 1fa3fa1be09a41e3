"""Stand-in of comfy.sd.CLIP: a tokenizer, an encoder and a patcher; clones share tokenizer and encoder."""

from __future__ import annotations

from .model_patcher import ModelPatcher


class CLIP:
    def __init__(self, tokenizer=None, cond_stage_model=None, no_init=False):
        if no_init:
            return
        self.tokenizer, self.cond_stage_model = tokenizer, cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model, "cpu", "cpu")
        self.layer_idx = None
        self.tokenizer_options = {}

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        n.tokenizer_options = self.tokenizer_options.copy()
        return n

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        out = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]
