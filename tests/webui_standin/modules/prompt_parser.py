"""modules/prompt_parser.py: prompt editing/scheduling and AND are left out; the conditioning of a list of
prompts is sd_model.get_learned_conditioning(prompts) when the model has it, else the prompts themselves
(so tests can see exactly the text the model would get: tags already removed). The prompt-list functions keep
the real signatures and return shapes: every prompt is one sub-prompt of weight 1 with one schedule entry."""


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


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    return [[[base_steps if hires_steps is None else hires_steps, prompt]] for prompt in prompts]


def get_multicond_prompt_list(prompts):
    res_indexes, prompt_indexes, prompt_flat_list = [], {}, []
    for prompt in prompts:
        index = prompt_indexes.setdefault(prompt, len(prompt_flat_list))
        if index == len(prompt_flat_list):
            prompt_flat_list.append(prompt)
        res_indexes.append([(index, 1.0)])
    return res_indexes, prompt_flat_list, prompt_indexes
