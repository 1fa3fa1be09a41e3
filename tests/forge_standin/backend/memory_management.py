"""Stand-in of Forge Neo's backend/memory_management.py: loading a patcher's model casts and moves its modules
under torch.inference_mode, in place (`param.data = ...`, as `Module.to` does), so after every load its weights
are inference tensors again while shared parameters stay shared. `loads` records each call."""

import torch

cpu = torch.device("cpu")
loads = []


def load_model_gpu(patcher) -> None:
    loads.append(patcher)
    if patcher.loaded:
        return
    with torch.inference_mode():
        seen = set()
        for tensor in [*patcher.model.parameters(), *patcher.model.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensor.data = tensor.data.clone()
    patcher.loaded = True


def load_models_gpu(patchers) -> None:
    for patcher in patchers:
        load_model_gpu(patcher)


def unload_all_models() -> None:
    """Forget what is loaded: the next load_model_gpu casts again."""
    for patcher in loads:
        patcher.loaded = False
