"""Stand-in of backend/patcher/unet.py: the U-Net's patcher; `.model` is its KModel."""


class UnetPatcher:
    def __init__(self, model):
        self.model = model
        self.loaded = False
