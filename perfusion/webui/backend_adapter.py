"""The engine's Adapter over a model loaded by Forge's `backend` (Forge Neo, lllyasviel's Forge): SD1.x and SDXL.

What that backend does for inference and training must undo, each in one place here:
- It loads (and moves, casts, patches LoRA into) weights under `torch.inference_mode`, so they are inference
  tensors, which autograd refuses to save for backward. `make_trainable` replaces each by a plain copy, through
  an id map because the textual-inversion wrapper keeps an alias of the token-embedding weight; every encode
  and U-Net call checks again, since the model patcher makes new ones whenever it loads or moves a module.
- `get_learned_conditioning` is decorated with `torch.inference_mode`: the undecorated function (`__wrapped__`)
  encodes with the concept's embedding registered in each text engine's own database (gradients reach it), and
  the engine's `TI` infotext record is put back afterwards.
- The U-Net's transformer blocks add residuals in place (`x += n`) after a LayerNorm saved `x`; while gradients
  are recorded each LayerNorm gets a copy of its input. SageAttention and flash attention have no backward:
  PyTorch's attention stands in for them.
- `KModel.apply_model` takes sigma and returns x0; training calls `diffusion_model(x, t, context=, y=)` and
  reads the schedule from the predictor (`alphas_cumprod`, `prediction_type`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Optional

import torch

from ..adapter import Embedding
from ..diffusion import pooled, with_pooled
from ..train import TrainError
from . import host
from .adapter import SDXL_ENCODERS, WebUIAdapter

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # anything else (gguf, bitsandbytes) is quantized storage


def make_trainable(modules: Iterable[torch.nn.Module]) -> int:
    """Replace every inference-mode parameter and buffer of `modules` by a plain copy (no gradient of its own),
    the same copy wherever one tensor is shared. Returns how many were replaced (0: nothing to do)."""
    copies: dict[int, torch.Tensor] = {}
    for root in modules:
        for module in root.modules():
            for table, make in ((module._parameters, _parameter_copy), (module._buffers, _buffer_copy)):
                for name, tensor in table.items():
                    if tensor is None or not tensor.is_inference():
                        continue
                    if id(tensor) not in copies:
                        copies[id(tensor)] = make(tensor)
                    table[name] = copies[id(tensor)]
    return len(copies)


def _parameter_copy(p: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(p.detach().clone(), requires_grad=False)


def _buffer_copy(b: torch.Tensor) -> torch.Tensor:
    return b.clone()


def quantized_storage(modules: Iterable[torch.nn.Module]) -> Optional[str]:
    """The first parameter kept in quantized storage (gguf, nf4/fp4), as 'name (type, dtype)'; None if none."""
    for root in modules:
        for name, p in root.named_parameters():
            if type(p) not in PLAIN_TENSORS or not p.dtype.is_floating_point:
                return f"{name} ({type(p).__name__}, {p.dtype})"
    return None


@contextmanager
def copies_into_norms(model: torch.nn.Module) -> Iterator[None]:
    """Each LayerNorm of `model` computes on a copy of its input while inside, so the in-place residual adds that
    follow it leave the tensor it saved for backward untouched."""
    handles = [
        m.register_forward_pre_hook(lambda _, args: (args[0].clone(), *args[1:]))
        for m in model.modules()
        if isinstance(m, torch.nn.LayerNorm)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """The U-Net's attention function is PyTorch's while inside if the backend chose one without a backward."""
    unet = sys.modules.get("backend.nn.unet")
    chosen = getattr(unet, "attention_function", None)
    if chosen is None or getattr(chosen, "__name__", "") not in ("attention_sage", "attention_flash"):
        yield
        return
    from backend import attention

    unet.attention_function = attention.attention_pytorch
    try:
        yield
    finally:
        unet.attention_function = chosen


class BackendAdapter(WebUIAdapter):
    """Adapter for `shared.sd_model` on Forge's backend: `forge_objects` (U-Net patcher with its KModel, CLIP, VAE)
    and one ClassicTextProcessingEngine per text encoder (`text_processing_engine`, SDXL `_l` and `_g`)."""

    def __init__(self, sd_model: Any, resolution: int = 1024):
        self.sd_model = sd_model
        self.sdxl = bool(getattr(sd_model, "is_sdxl", False))
        if not (self.sdxl or getattr(sd_model, "is_sd1", False)):
            raise TrainError(
                f"training on this WebUI needs an SD1.x or SDXL checkpoint; the loaded one is "
                f"{type(sd_model).__name__}: choose an SD1.5 or SDXL checkpoint"
            )
        self.resolution = resolution
        self.engines = host.text_engines(sd_model)
        if len(self.engines) != (2 if self.sdxl else 1):
            raise TrainError("this model's text engines are not SD1's one or SDXL's clip_l and clip_g")
        self.encoders = [e.text_encoder for e in self.engines]
        self.kmodel = sd_model.forge_objects.unet.model
        self.diffusion_model = self.kmodel.diffusion_model
        quantized = quantized_storage([self.diffusion_model, *self.encoders])
        if quantized:
            raise TrainError(
                f"this checkpoint keeps weights in quantized storage ({quantized}), which cannot be trained "
                "through: load a float16/bfloat16/float32 checkpoint to train"
            )
        predictor = self.kmodel.predictor
        self.alphas_cumprod = predictor.alphas_cumprod.detach().double().cpu()
        self.prediction = "v" if predictor.prediction_type == "v_prediction" else "eps"
        self.dtype = self.kmodel.computation_dtype
        self._describe()
        sd_model.set_clip_skip(host.clip_skip())  # a generation sets it; training may come first

    def _ready(self, patcher: Any, modules: Iterable[torch.nn.Module]) -> None:
        """The patcher's model loaded where the backend computes, its weights plain tensors."""
        from backend import memory_management

        memory_management.load_model_gpu(patcher)
        make_trainable(modules)

    def word_embedding(self, word: str) -> Embedding:
        keys = SDXL_ENCODERS if self.sdxl else ("",)
        out = {}
        for key, engine in zip(keys, self.engines):
            table = engine.text_encoder.transformer.text_model.embeddings.token_embedding
            table = getattr(table, "wrapped", table)  # the textual-inversion wrapper's plain nn.Embedding
            ids = torch.tensor(engine.tokenize([word])[0], device=table.weight.device)
            with torch.no_grad():
                out[key] = table(ids).float().clone()
        return out

    def _autocast(self) -> AbstractContextManager:
        return nullcontext()  # the backend casts to its computation dtype itself

    def _condition(self, prompts: list[str], size: tuple[int, int]) -> torch.Tensor:
        """The text engines' conditioning of `prompts` (registered words included) with gradients: rows [B, N, d]
        (SDXL: carrying the pooled vector [B, k] whose size conditioning says `size`, (width, height) px)."""
        from modules.prompt_parser import SdConditioning

        self._ready(self.sd_model.forge_objects.clip.patcher, self.encoders)
        with host.text_engine_notes_kept():
            learned = type(self.sd_model).get_learned_conditioning.__wrapped__  # without its inference_mode
            cond = learned(self.sd_model, SdConditioning(prompts, width=size[0], height=size[1]))
        return with_pooled(cond["crossattn"], cond["vector"]) if self.sdxl else cond

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self._ready(self.sd_model.forge_objects.unet, [self.diffusion_model])
        extra = {"y": pooled(context).to(self.dtype)} if self.sdxl else {}
        with ExitStack() as stack:
            if torch.is_grad_enabled():
                stack.enter_context(copies_into_norms(self.diffusion_model))
                stack.enter_context(differentiable_attention())
            out = self.diffusion_model(
                x.to(self.dtype), t.float(), context=context.to(self.dtype), transformer_options={}, **extra
            )
        return out.float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        # the backend encodes under inference_mode: a copy made outside it is a plain tensor
        return self.sd_model.encode_first_stage(images.to(self.device)).clone()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sd_model.decode_first_stage(latents).clone()
