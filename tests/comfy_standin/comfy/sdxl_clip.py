"""Stand-in of comfy.sdxl_clip.SDXLTokenizer: two SDTokenizers, clip_l (768) and clip_g (1280)."""

from .sd1_clip import SDTokenizer


class SDXLTokenizer:
    def __init__(self, embedding_directory=None, inner=None):
        self.clip_l = SDTokenizer(inner, embedding_directory=embedding_directory)
        self.clip_g = SDTokenizer(
            inner,
            pad_with_end=False,
            embedding_directory=embedding_directory,
            embedding_size=1280,
            embedding_key="clip_g",
        )

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {
            "g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs),
            "l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
        }
