"""The embedded mini text-to-image model: an ldm UNetModel in pixel space (32x32 RGB) conditioned by a
small causal CLIPTextModel over the real CLIP tokenizer, v-prediction on a cosine schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from transformers import CLIPTextConfig, CLIPTextModel

from ..adapter import LdmClipAdapter, padding_mask
from ..clip_tokenizer import load_tokenizer
from ..files import atomic_write, short_hash
from ..tokens import CLIP_EOS

WEIGHTS = Path(__file__).with_name("weights") / "mini.safetensors"
UNET = dict(
    image_size=32,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    channel_mult=(1, 2, 2),
    num_head_channels=16,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=64,
    use_linear_in_transformer=True,
    use_checkpoint=False,
    legacy=False,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    projection_dim=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=32,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# World 2 (48x48, perfusion/world/w2): four levels (48, 24, 12, 6 px), attention at 12 and 6 px only (self-
# attention at 24x24 would cost 4x the step), wider at the low levels where the caption's words are bound.
UNET_W2 = dict(UNET, image_size=48, channel_mult=(1, 2, 3, 4), attention_resolutions=(4, 8))
TEXT_W2 = dict(TEXT, max_position_embeddings=48)  # three-object captions run to ~42 tokens
TIMESTEPS = 1000
LATENT_SHAPE = (3, 32, 32)


def cosine_alphas_cumprod(steps: int = TIMESTEPS, s: float = 0.008) -> torch.Tensor:
    """alpha_bar_t for t = 0..steps-1 (Nichol & Dhariwal cosine schedule, betas capped at 0.999), float64."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def build(
    seed: int = 0, unet: Optional[dict] = None, text: Optional[dict] = None, token_scale: float = 1.0
) -> tuple[torch.nn.Module, CLIPTextModel]:
    """Fresh (unet, text_encoder) with the mini configuration (or the given one, e.g. from a weights file).

    token_scale multiplies the random token table: at 10 a word's own embedding outweighs what the
    causal attention mixes in from the words before it, so each context row stands for its word (as
    in the trained CLIP), instead of carrying the earlier words' (and a concept's) encodings along."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, encoder = UNetModel(**(unet or UNET)), CLIPTextModel(CLIPTextConfig(**(text or TEXT)))
    with torch.no_grad():
        encoder.get_input_embeddings().weight.mul_(token_scale)
    return model, encoder


def save_weights(unet: torch.nn.Module, text: CLIPTextModel, path: Path, meta: dict) -> Path:
    """Weights as safetensors (token embedding table in fp16, everything else fp32), atomically."""
    tensors = {f"unet.{k}": v.detach().float().contiguous() for k, v in unet.state_dict().items()}
    for k, v in text.state_dict().items():
        tensors[f"text.{k}"] = v.detach().to(torch.float16 if "token_embedding" in k else torch.float32).contiguous()
    return atomic_write(path, save_bytes(tensors, metadata={k: json.dumps(v) for k, v in meta.items()}))


def weights_meta(path: Path = WEIGHTS) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load(path: Path = WEIGHTS, device: str = "cpu") -> LdmClipAdapter:
    """The mini model behind the engine's Adapter (eval mode, no gradients on its weights)."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{path}: mini model weights missing; train them with `./dev.sh python -m perfusion.world.train_model`"
        )
    tensors = load_file(str(path))
    config = weights_meta(path).get("config", {})  # weights made with an earlier configuration load as made
    unet, text = build(0, config.get("unet"), config.get("text"))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")})
    for m in (unet, text):
        m.eval().requires_grad_(False).to(device)
    return LdmClipAdapter(
        unet,
        text,
        load_tokenizer(),
        cosine_alphas_cumprod(),
        "v",
        model_hash=short_hash(Path(path).read_bytes(), 10),
        zero_padding=bool(config.get("zero_padding", False)),
    )


def tokenize(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Token ids int64 [B, length] (BOS, words, EOS padding), cut at `length`."""
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")[
        "input_ids"
    ]


def encode_ids(text: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """Context [B, N, 64] for token ids [B, N], padding rows zeroed; used by the model trainer, where the
    encoder may be trainable (the adapter's encode serves the frozen model)."""
    ids = ids.to(text.device)
    lengths = (ids != CLIP_EOS).sum(1)  # BOS + tokens: the first EOS sits at this index
    return text(input_ids=ids).last_hidden_state * padding_mask(lengths, ids.shape[1])


def encode_captions(parts: tuple, captions: list[str]) -> torch.Tensor:
    """Context [B, N, 64] (padding rows zeroed) for captions from parts = (tokenizer, text encoder)."""
    tokenizer, text = parts
    return encode_ids(text, tokenize(tokenizer, captions, text.config.max_position_embeddings))
