"""The extension loaded into the WebUI stand-in, over the tests' tiny real-architecture model.

`TinySDModel` offers what the WebUI's LatentDiffusion offers an extension: `model.diffusion_model`
(an ldm UNetModel), `cond_stage_model` (tokenize, encode_embedding_init_text) and
`get_learned_conditioning`, which applies the embedding database's vectors to whole words as the
WebUI's textual-inversion lookup does. The sampler hook runs the U-Net on the CFG batch.
"""

from __future__ import annotations

import os
import sys
from collections import namedtuple
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "webui_standin"))

import pytest  # noqa: E402
import torch  # noqa: E402
from concepts import layer_widths, random_covariance  # noqa: E402
from modules import (  # noqa: E402
    errors,
    extensions,
    extra_networks,
    paths,
    processing,
    script_callbacks,
    scripts,
    sd_hijack,
    sd_models,
    sd_samplers,
    shared,
    ui_extra_networks,
)
from tiny import tiny_adapter  # noqa: E402

from perfusion import Concept, gate_direction, save_concept  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENSION = os.path.join(paths.extensions_dir, "sd-webui-perfusion")
FORGE_STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forge_standin")


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class TinyCondStage(torch.nn.Module):
    """The WebUI's FrozenCLIPEmbedderWithCustomWords reduced to its contract: chunks of 75 tokens + BOS/EOS,
    textual-inversion vectors from the embedding DB placed at fix.offset + 1 (Embedding.vectors of them),
    gradients flowing into the vectors (no emphasis, no comma backtracking)."""

    chunk_length = 75

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        self.database = lambda: sd_hijack.model_hijack.embedding_db  # Forge's stand-in: its text engine's

    def tokenize(self, texts):
        return [self.adapter._ids(t) for t in texts]

    def encode_embedding_init_text(self, init_text, nvpt):
        return self.adapter.word_embedding(init_text)[""][:nvpt]

    def tokenize_line(self, line):
        db = self.database()
        tokens, chunks, chunk, position = self.tokenize([line])[0], [], PromptChunk(), 0

        def next_chunk():
            nonlocal chunk
            pad = self.chunk_length - len(chunk.tokens)
            chunk.tokens = [49406] + chunk.tokens + [49407] * (pad + 1)
            chunk.multipliers = [1.0] * len(chunk.tokens)
            chunks.append(chunk)
            chunk = PromptChunk()

        while position < len(tokens):
            embedding, length = db.find_embedding_at_position(tokens, position)
            if embedding is None:
                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()
                chunk.tokens.append(tokens[position])
                position += 1
                continue
            n = int(embedding.vectors)
            if len(chunk.tokens) + n > self.chunk_length:
                next_chunk()
            chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
            chunk.tokens += [0] * n
            position += length
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks, sum(len(c.tokens) for c in chunks)

    def forward(self, texts):
        out = []
        for text in texts:
            chunks, _ = self.tokenize_line(text)
            ids = torch.tensor([c.tokens for c in chunks])
            where = torch.zeros(ids.shape, dtype=torch.bool)
            rows = []
            for k, c in enumerate(chunks):
                for fix in c.fixes:
                    n = int(fix.embedding.vectors)
                    where[k, fix.offset + 1 : fix.offset + 1 + n] = True
                    rows.append(fix.embedding.vec[:n])
            self.adapter._replacement = (where, torch.cat(rows)) if rows else None
            try:
                out.append(
                    self.adapter.text_encoder(input_ids=ids).last_hidden_state.reshape(1, -1, self.adapter.context_dim)
                )
            finally:
                self.adapter._replacement = None
        width = max(o.shape[1] for o in out)
        return torch.cat(
            [torch.cat([o, o[:, -77:].expand(1, width - o.shape[1], -1)], 1) if o.shape[1] < width else o for o in out]
        )


class VaePlacement(torch.nn.Linear):
    """Where the WebUI keeps its VAE (`first_stage_model`). The tiny model's first stage is the identity, so
    only the VAE's moves between devices are observable: `moves` lists every `.to(device)`."""

    def __init__(self):
        super().__init__(1, 1)
        self.moves = []

    def to(self, device, *args, **kwargs):
        self.moves.append(device)
        return super().to(device, *args, **kwargs)


class TinySDModel(torch.nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        self.model = torch.nn.Module()
        self.model.diffusion_model = adapter.diffusion_model
        self.cond_stage_model = TinyCondStage(adapter)
        self.first_stage_model = VaePlacement()
        self.calls = 0  # text encodings made (to see the conditioning cache at work)

        self.alphas_cumprod = adapter.alphas_cumprod.float()
        self.parameterization = adapter.prediction

    def get_learned_conditioning(self, prompts):
        self.calls += 1
        return self.cond_stage_model(list(prompts))

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond)

    def encode_first_stage(self, images):
        return self.adapter.encode_images(images)

    def get_first_stage_encoding(self, encoded):
        return encoded

    def decode_first_stage(self, latents):
        return self.adapter.decode_latents(latents)


def unet_sampler(params):
    """The stand-in's model call: the U-Net on [cond rows; uncond rows] at a timestep from sigma."""
    model = shared.sd_model
    context = torch.cat([params.text_cond, params.text_uncond])
    t = (params.sigma * 97).long().clamp(0, 999)
    return model.model.diffusion_model(params.x, t, context=context)


def load_model(seed: int = 0) -> TinySDModel:
    sd_models.instantiate_from_config = lambda config, state_dict=None: TinySDModel(tiny_adapter(seed=seed))
    sd_samplers.sample_hook = unet_sampler
    return sd_models.load_model()


def load_extension() -> None:
    """Start-up as the WebUI does it (initialize_rest) with the repository as an installed extension."""
    if not os.path.lexists(EXTENSION):
        os.makedirs(paths.extensions_dir, exist_ok=True)
        os.symlink(REPO, EXTENSION)
    extensions.list_extensions()
    scripts.load_scripts()
    ui_extra_networks.initialize()
    extra_networks.initialize()
    script_callbacks.before_ui_callback()


def unload_extension() -> None:
    """Undo load_extension (other tests list extensions too)."""
    script_callbacks.script_unloaded_callback()
    if os.path.islink(EXTENSION):
        os.unlink(EXTENSION)
    extensions.list_extensions()
    scripts.load_scripts()
    extra_networks.initialize()
    ui_extra_networks.initialize()


def reload_ui() -> None:
    script_callbacks.app_reload_callback()
    script_callbacks.script_unloaded_callback()
    scripts.load_scripts()
    ui_extra_networks.initialize()
    extra_networks.initialize()
    script_callbacks.before_ui_callback()


def runner(is_img2img: bool = False):
    """A ScriptRunner with the extension's accordion script; returns (runner, script)."""
    r = scripts.ScriptRunner()
    r.initialize_scripts(is_img2img)
    script = next(s for s in r.alwayson_scripts if s.title() == "Perfusion")
    script.args_from, script.args_to = 1, 7  # the accordion's 6 controls
    return r, script


def txt2img(prompt, *, args=(True, 0.7, 0.15, "local", "approximate"), negative="", **kw):
    """One generation through process_images with the accordion's args; returns Processed."""
    r, _ = runner()
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt,
        negative_prompt=negative,
        seed=kw.pop("seed", 1),
        steps=kw.pop("steps", 3),
        width=kw.pop("width", 64),
        height=kw.pop("height", 64),
        **kw,
    )
    p.scripts, p.script_args = r, (0, *args)
    return processing.process_images(p)


def make_concept(
    folder, name="hugsy", token="hugsy", superclass="teddy", *, prompt=None, seed=0, scale=1.0, **fields
) -> Concept:
    """A concept for the loaded tiny model whose i* is the model's own encoding of `token` (so its gate
    opens on the word), saved as `folder/name.safetensors`."""
    adapter = shared.sd_model.adapter
    g = torch.Generator().manual_seed(seed)
    embedding = {"": torch.randn(1, adapter.context_dim, generator=g) * 0.5}
    prompt = prompt or f"a photo of {token}"
    with torch.no_grad():
        context, rows = adapter.encode([prompt], {token: embedding})
        i_star = context[0, rows[token][0][-1]]
        sup_context, sup_rows = adapter.encode([prompt.replace(token, superclass)], {superclass: None})
        i_super = sup_context[0, sup_rows[superclass][0][-1]]
    cov = random_covariance(adapter.context_dim, seed=seed).float() + torch.outer(i_super, i_super) * 0.1
    a, energy = gate_direction(i_star.double(), torch.linalg.solve(cov.double(), i_star.double()))
    values = {n: torch.randn(w, generator=g) * scale for n, w in layer_widths(adapter.diffusion_model).items()}
    concept = Concept(
        token=token,
        superclass=superclass,
        embedding=embedding,
        i_star=i_star,
        a=a.float(),
        energy=energy.float(),
        i_super=i_super,
        values=values,
        name=name,
        **fields,
    )
    save_concept(concept, os.path.join(folder, f"{name}.safetensors"))
    return concept


def reset() -> None:
    """A clean host between tests."""
    errors.exception_records.clear()
    processing.StableDiffusionProcessing.cached_c[:] = [None, None]
    processing.StableDiffusionProcessing.cached_uc[:] = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c[:] = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc[:] = [None, None]
    shared.state.interrupted = False
    shared.opts.data.pop("perfusion_dir", None)


@contextmanager
def concepts_folder(folder):
    """A test's concepts folder on a clean host; afterwards no exception was recorded and the sampler is back."""
    reset()
    shared.opts.data["perfusion_dir"] = str(folder)
    yield folder
    assert errors.exception_records == []
    sd_samplers.sample_hook = unet_sampler


def spy_on_gate(concept) -> list[float]:
    """Record, at every sampler call, the highest similarity a . e over the cond rows (1 at the word's row
    when its learned vectors reached the text encoder)."""
    seen = []

    def spy(params):
        seen.append((params.text_cond[0] @ concept.a).max().item())
        return unet_sampler(params)

    sd_samplers.sample_hook = spy
    return seen


def write_photos(folder, count: int = 3, seed: int = 0):
    """`count` random 72x72 RGB photos bear0.png, bear1.png, ... in `folder` (created if missing); returns it."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray((rng.random((72, 72, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"bear{k}.png"))
    return folder


@contextmanager
def forge_standin():
    """Forge Neo's stand-in packages (tests/forge_standin: `backend`, `modules_forge`) importable inside; the
    host's kind is told again on entry and after, and the stand-in's modules are forgotten."""
    from perfusion.webui import host as perfusion_host

    sys.path.insert(0, FORGE_STANDIN)
    perfusion_host.kind.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(FORGE_STANDIN)
        for name in list(sys.modules):
            if name.split(".")[0] in ("backend", "modules_forge"):
                del sys.modules[name]
        perfusion_host.kind.cache_clear()


def world_fixture():
    """A test module's `world` fixture: the extension loaded into the stand-in WebUI with the tiny model, for the
    module's tests (`world = webui_host.world_fixture()`)."""

    @pytest.fixture(scope="module")
    def world():
        load_extension()
        model = load_model()
        yield model
        unload_extension()

    return world
