"""modules/script_callbacks.py. Callbacks remember the file that registered them (first stack frame outside
this module); load_scripts() clears them all before re-running every scripts/*.py ("Reload UI"). Ordering by
metadata.ini and user settings is left out: callbacks run in registration order (before_ui and
script_unloaded in REVERSE order, as in the WebUI). Errors are reported, never raised."""
import dataclasses
import inspect
import os
from typing import Any, Optional

from modules import errors


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step  # = shared.state.sampling_step, which lags one step behind
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser  # its .step counts denoiser calls exactly


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    from modules import extensions
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'
    extension = extensions.find_extension(filename)
    callback_name = f"{extension.canonical_name if extension else 'base'}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f'/{name}'
    unique_callback_name = callback_name
    for index in range(1000):
        if not any(x.name == unique_callback_name for x in callbacks):
            break
        unique_callback_name = f'{callback_name}-{index + 1}'
    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):
    return unordered_callbacks.copy()


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get('callbacks_' + category, [])
    return sort_callbacks(category, unordered_callbacks)


callback_map = {f"callbacks_{k}": [] for k in (
    "app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved", "image_saved",
    "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component", "after_component",
    "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload", "list_optimizers", "list_unets",
    "before_token_counter")}


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def _run(category, *args, reverse=False):
    callbacks = ordered_callbacks(category)
    for c in (reversed(callbacks) if reverse else callbacks):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, category)


def app_started_callback(demo: Optional[Any], app):
    _run('app_started', demo, app)


def app_reload_callback():
    _run('on_reload')


def model_loaded_callback(sd_model):
    _run('model_loaded', sd_model)


def ui_tabs_callback():
    res = []
    for c in ordered_callbacks('ui_tabs'):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_settings_callback():
    _run('ui_settings')


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _run('cfg_denoiser', params)


def infotext_pasted_callback(infotext: str, params: dict):
    _run('infotext_pasted', infotext, params)


def script_unloaded_callback():
    _run('script_unloaded', reverse=True)


def before_ui_callback():
    _run('before_ui', reverse=True)


def remove_current_script_callbacks():
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else 'unknown file'
    if filename == 'unknown file':
        return
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)


def _caller():
    stack = [x for x in inspect.stack() if x.filename != __file__]
    return stack[0].filename if stack else 'unknown file'


def _registrar(category, map_key=None):
    def register(callback, *, name=None):
        add_callback(callback_map[map_key or 'callbacks_' + category], callback, name=name, category=category, filename=_caller())
    register.__name__ = register.__qualname__ = 'on_' + category
    return register


# on_app_started(callback(demo, app)): demo is None in API-only mode; on_model_loaded(callback(sd_model));
# on_ui_tabs(callback() -> [(blocks, title, elem_id)]); on_infotext_pasted(callback(infotext, params)); ...
on_before_reload = _registrar('on_reload', 'callbacks_on_reload')
for _category in ("app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved",
                  "image_saved", "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component",
                  "after_component", "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "list_optimizers",
                  "list_unets", "before_token_counter"):
    globals()['on_' + _category] = _registrar(_category)
del _category
