"""modules/shared_cmd_options.py + cmd_args.py: a subset of the real flags, same names and defaults. Every
extension's preload(parser) runs first, as in the WebUI. Arguments come from COMMANDLINE_ARGS only."""
import argparse
import os
import shlex

from modules import script_loading
from modules.paths_internal import data_path, models_path, extensions_dir, extensions_builtin_dir, normalized_filepath

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", type=normalized_filepath, default=data_path)
parser.add_argument("--models-dir", type=normalized_filepath, default=None)
parser.add_argument("--ckpt-dir", type=normalized_filepath, default=None)
parser.add_argument("--embeddings-dir", type=normalized_filepath, default=os.path.join(data_path, 'embeddings'))
parser.add_argument("--hypernetwork-dir", type=normalized_filepath, default=os.path.join(models_path, 'hypernetworks'))
parser.add_argument("--textual-inversion-templates-dir", type=normalized_filepath, default=os.path.join(data_path, 'textual_inversion_templates'))
for flag in ("--no-half", "--no-half-vae", "--medvram", "--medvram-sdxl", "--lowvram", "--upcast-sampling", "--api", "--nowebui",
             "--api-log", "--share", "--listen", "--hide-ui-dir-config", "--freeze-settings", "--no-hashing", "--no-prompt-history",
             "--disable-all-extensions", "--disable-extra-extensions", "--skip-load-model-at-start", "--disable-nan-check",
             "--do-not-download-clip", "--enable-insecure-extension-access", "--xformers", "--opt-sdp-attention", "--ui-debug-mode"):
    parser.add_argument(flag, action='store_true')
parser.add_argument("--precision", type=str, choices=["full", "half", "autocast"], default="autocast")
parser.add_argument("--use-cpu", nargs='+', default=[], type=str.lower)
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--server-name", type=str, default=None)
parser.add_argument("--port", type=int, default=None)
parser.add_argument("--ngrok", type=str, default=None)
parser.add_argument("--device-id", type=str, default=None)
parser.add_argument("--ui-settings-file", type=str, default=os.path.join(data_path, 'config.json'))

script_loading.preload_extensions(extensions_dir, parser)
script_loading.preload_extensions(extensions_builtin_dir, parser)

cmd_opts = parser.parse_known_args(shlex.split(os.environ.get("COMMANDLINE_ARGS", "")))[0]
cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
cmd_opts.disable_extension_access = cmd_opts.webui_is_non_local and not cmd_opts.enable_insecure_extension_access
