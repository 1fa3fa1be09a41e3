"""Stand-in of comfy.model_patcher.ModelPatcher: clones share the model; object patches are set on it in place
while the clone is loaded and restored from a backup shared by every clone."""

from __future__ import annotations

import copy

from . import utils


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.weight_inplace_update = weight_inplace_update
        self.patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.parent = None

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        return n

    def is_clone(self, other) -> bool:
        return hasattr(other, "model") and self.model is other.model

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return utils.get_attr(self.model, name)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k in self.object_patches:
            old = utils.set_attr(self.model, k, self.object_patches[k])
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        for k in list(self.object_patches_backup):
            utils.set_attr(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup.clear()
