"""modules/shared_options.py: only the core settings the stand-in itself reads (defaults as in v1.10.1)."""
from modules.options import OptionInfo, options_section

restricted_opts = set()

options_templates = {}
options_templates.update(options_section(('sd', "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "use_old_scheduling": OptionInfo(False, "Use old prompt editing timelines"),
    "emphasis": OptionInfo("Original", "Emphasis mode"),
}))
options_templates.update(options_section(('extra_networks', "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
    "extra_networks_add_text_separator": OptionInfo(" ", "Extra networks separator"),
    "extra_networks_card_show_desc": OptionInfo(True, "Show description on card"),
    "extra_networks_card_description_is_html": OptionInfo(False, "Treat card description as HTML"),
    "textual_inversion_print_at_load": OptionInfo(False, "Print a list of Textual Inversion embeddings when loading model"),
}))
options_templates.update(options_section(('saving-images', "Saving images/grids", "saving"), {
    "samples_format": OptionInfo('png', 'File format for images'),
    "enable_pnginfo": OptionInfo(True, "Save text information about generation parameters as chunks to png files"),
}))
options_templates.update(options_section(('infotext', "Infotext", "ui"), {
    "infotext_skip_pasting": OptionInfo([], "Disregard fields from pasted infotext"),
}))
options_templates.update(options_section((None, "Hidden options"), {
    "list_hidden_files": OptionInfo(True, "Load models/files in hidden directories"),
    "disabled_extensions": OptionInfo([], "Disable these extensions"),
    "disable_all_extensions": OptionInfo("none", "Disable all extensions (preserves the list of disabled extensions)"),
}))
