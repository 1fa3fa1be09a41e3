"""Small real-architecture models for tests and benchmarks (random init, fixed seed, no weights).

* :func:`small_unet` / :func:`sd15_unet` build the real ``ldm`` ``UNetModel`` (with its
  ``SpatialTransformer`` / ``CrossAttention`` ``attn2`` layers), as used by the WebUI.
* :func:`small_text_encoder` builds a small ``transformers.CLIPTextModel`` that takes the real
  CLIP token ids (see ``perfusion.clip_tokenizer.load_tokenizer``).

One ldm quirk is handled here: ldm zero-initialises several output projections (every ``SpatialTransformer.proj_out``,
  the last conv of each ``ResBlock`` and the UNet's final conv), which makes a freshly built
  UNet return exactly zero and ignore ``context`` entirely. With ``reinit_zero=True`` (the
  default) those layers get an ordinary random init so the output depends on the input and
  on every cross-attention layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

__all__ = ["small_unet", "sd15_unet", "small_text_encoder", "encode", "attn2_layers", "MAX_LENGTH"]

MAX_LENGTH = 77
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _reinit_zeroed(model: nn.Module) -> int:
    """Give zero-initialised conv/linear layers a normal random init; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if not bool(module.weight.detach().any()):
                module.reset_parameters()
                count += 1
    return count


def _build_unet(seed: int, reinit_zero: bool, **kwargs) -> UNetModel:
    with _seeded(seed):
        model = UNetModel(**kwargs)
        if reinit_zero:
            _reinit_zeroed(model)
    return model.eval()


def small_unet(
    context_dim: int = 768,
    model_channels: int = 32,
    seed: int = 0,
    *,
    num_res_blocks: int = 1,
    channel_mult: Sequence[int] = (1, 2),
    attention_resolutions: Sequence[int] = (1, 2),
    num_head_channels: int = 16,
    use_linear_in_transformer: bool | None = None,
    reinit_zero: bool = True,
) -> UNetModel:
    """A small ldm UNetModel with spatial transformers, in/out channels 4.

    With the defaults there are 7 ``attn2`` cross-attention layers: 2 in ``input_blocks``,
    1 in ``middle_block`` and 4 in ``output_blocks``. ``use_linear_in_transformer`` defaults
    to ``context_dim != 768`` (SD1.x uses 1x1 convs, SD2/SDXL use linear projections).
    ``model_channels`` must be a multiple of 32 (ldm's GroupNorm uses 32 groups).
    """
    if use_linear_in_transformer is None:
        use_linear_in_transformer = context_dim != 768
    return _build_unet(
        seed,
        reinit_zero,
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=model_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_resolutions),
        channel_mult=tuple(channel_mult),
        num_head_channels=num_head_channels,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=context_dim,
        use_linear_in_transformer=use_linear_in_transformer,
        use_checkpoint=False,
        legacy=False,
    )


def sd15_unet(seed: int = 0, *, reinit_zero: bool = True) -> UNetModel:
    """The SD1.5 UNet shape (~860M params), random init, eval(). For benchmarks only.

    model_channels 320, channel_mult (1,2,4,4), attention_resolutions (4,2,1),
    num_res_blocks 2, num_heads 8, context_dim 768, legacy False: 16 ``attn2`` layers.
    """
    return _build_unet(
        seed,
        reinit_zero,
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        num_res_blocks=2,
        attention_resolutions=(4, 2, 1),
        channel_mult=(1, 2, 4, 4),
        num_heads=8,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=768,
        use_linear_in_transformer=False,
        use_checkpoint=False,
        legacy=False,
    )


def sdxl_shaped_unet(seed: int = 0, *, reinit_zero: bool = True) -> UNetModel:
    """An SDXL-shaped UNet in ldm's UNetModel (~2.4B params), random init, eval(). For benchmarks only.

    SDXL's widths (320, 640, 1280), a 2048-wide context, linear projections and six transformer blocks at
    both attention levels (ldm takes one depth): 66 ``attn2`` layers against SDXL's 70; no adm vector.
    """
    return _build_unet(
        seed,
        reinit_zero,
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        num_res_blocks=2,
        attention_resolutions=(2, 4),
        channel_mult=(1, 2, 4),
        num_head_channels=64,
        use_spatial_transformer=True,
        transformer_depth=6,
        context_dim=2048,
        use_linear_in_transformer=True,
        use_checkpoint=False,
        legacy=False,
    )


def attn2_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every cross-attention layer (name ending in ``attn2``)."""
    return [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]


def small_text_encoder(hidden: int = 64, layers: int = 2, seed: int = 0, *, heads: int | None = None) -> CLIPTextModel:
    """A small CLIPTextModel for the real CLIP ids (vocab 49408, 77 positions, causal).

    bos 49406, eos 49407, pad 49407 (as the CLIP tokenizer pads with <|endoftext|>).
    ``heads`` defaults to ``hidden // 32`` (at least 1).
    """
    if heads is None:
        heads = max(1, hidden // 32)
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    with _seeded(seed):
        model = CLIPTextModel(config)
    return model.eval()


def encode(tokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Tokenize padded/truncated to 77 and return ``last_hidden_state`` ``[B, 77, hidden]``.

    No attention mask is passed (as in Stable Diffusion: padding positions are attended
    causally like any other token). Gradients are not disabled here; wrap the call in
    ``torch.no_grad()`` when they are not needed.
    """
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    out = text_encoder(input_ids=batch["input_ids"].to(device))
    return out.last_hidden_state
