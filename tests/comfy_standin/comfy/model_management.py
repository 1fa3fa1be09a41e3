"""Stand-in of comfy.model_management.load_models_gpu: one loaded patcher per model."""

current_loaded_models = []  # the loaded patchers, newest first


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None):
    for patcher in models:
        for loaded in list(current_loaded_models):
            if loaded is patcher:
                break
            if loaded.is_clone(patcher):  # another patcher of the same model: put its patches back first
                loaded.unpatch_model()
                current_loaded_models.remove(loaded)
        else:
            patcher.patch_model()
            current_loaded_models.insert(0, patcher)
