"""modules/shared.py. In the WebUI opts/state are created by shared_init.initialize() and sd_model is a
lazy-loading property; here they are created at import and sd_model is a plain attribute (None = no model)."""
from modules import shared_cmd_options, options, shared_options, shared_state, util
from modules.paths_internal import models_path, script_path, data_path, extensions_dir, extensions_builtin_dir  # noqa: F401

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

parallel_processing_allowed = True
demo = None  # gr.Blocks once the UI exists; stays None in API-only mode
device = None
hypernetworks = {}
loaded_hypernetworks = []

options_templates = shared_options.options_templates
restricted_opts = shared_options.restricted_opts
opts = options.Options(options_templates, restricted_opts)
state = shared_state.State()
sd_model = None
settings_components = None
tab_names = []
latent_upscale_default_mode = "Latent"
latent_upscale_modes = {"Latent": {"mode": "bilinear", "antialias": False}}
sd_upscalers = []

options_section = options.options_section
OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML

natural_sort_key = util.natural_sort_key
listfiles = util.listfiles
walk_files = util.walk_files
