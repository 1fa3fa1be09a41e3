"""Stand-in for `open_clip`, only so that perfusion-pytorch 0.1.23 imports (benchmarks only).

The real open-clip-torch imports torchvision, which is not usable in the dev environment.
perfusion-pytorch touches open_clip at import time in exactly two places:

* `embedding.py`: `from open_clip import tokenizer`, and `tokenizer.tokenize` as a default
  argument value of `EmbeddingWrapper.__init__` (evaluated when the class is defined);
* `open_clip.py`: `import open_clip`; `create_model_and_transforms` and `get_tokenizer` are
  looked up only when an `OpenClipAdapter` is constructed.

The benchmark uses neither: it only times `Rank1EditModule.forward` on given text encodings.
Every function here raises if called, so nothing can silently use a fake CLIP.
"""
from . import tokenizer

__all__ = ["tokenizer", "create_model_and_transforms", "get_tokenizer"]


def _unavailable(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(f"open_clip.{name} is a benchmark stand-in (benchmarks/_open_clip_stub); "
                           "the real open_clip is not importable here")
    fn.__name__ = name
    return fn


create_model_and_transforms = _unavailable("create_model_and_transforms")
get_tokenizer = _unavailable("get_tokenizer")
