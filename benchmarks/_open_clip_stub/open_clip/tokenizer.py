"""Stand-in for `open_clip.tokenizer`: `tokenize` exists (perfusion-pytorch binds it as a default
argument at import time) but raises if anything actually calls it."""


def tokenize(texts, context_length: int = 77):
    raise RuntimeError("open_clip.tokenizer.tokenize is a benchmark stand-in (benchmarks/_open_clip_stub)")
