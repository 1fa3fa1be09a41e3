"""modules/prompt_parser.py: prompt editing/scheduling and AND are left out; the conditioning of a list of
prompts is sd_model.get_learned_conditioning(prompts) when the model has it, else the prompts themselves
(so tests can see exactly the text the model would get: tags already removed)."""


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        copy_from = copy_from if copy_from is not None else prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, 'is_negative_prompt', False)
        self.width = width or getattr(copy_from, 'width', None)
        self.height = height or getattr(copy_from, 'height', None)


def get_learned_conditioning(model, prompts: SdConditioning, steps, hires_steps=None, use_old_scheduling=False):
    if model is not None and hasattr(model, "get_learned_conditioning"):
        return model.get_learned_conditioning(prompts)
    return list(prompts)


get_multicond_learned_conditioning = get_learned_conditioning
