"""Stand-in of backend/patcher/clip.py: `CLIP.cond_stage_model` holds the text encoders by key (clip_l), and
`CLIP.patcher` loads them."""

import torch

from backend.patcher.unet import UnetPatcher


class JointTextEncoder(torch.nn.Module):
    def __init__(self, encoders: dict):
        super().__init__()
        for key, encoder in encoders.items():
            setattr(self, key, encoder)


class CLIP:
    def __init__(self, model_dict: dict):
        self.cond_stage_model = JointTextEncoder(model_dict)
        self.patcher = UnetPatcher(self.cond_stage_model)
