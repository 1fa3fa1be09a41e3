"""modules/paths_internal.py. script_path is the stand-in root (tests/webui_standin). --data-dir/--models-dir
come from COMMANDLINE_ARGS only (never pytest's argv); without --data-dir a temporary folder is used so
that nothing an extension creates under models/ or extensions/ lands in the repository."""
import argparse
import atexit
import os
import shlex
import shutil
import tempfile
from pathlib import Path

normalized_filepath = lambda filepath: str(Path(filepath).absolute())  # noqa: E731

modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.path.dirname(modules_path)
sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = default_sd_model_file = os.path.join(script_path, "model.ckpt")
cwd = os.getcwd()

parser_pre = argparse.ArgumentParser(add_help=False)
parser_pre.add_argument("--data-dir", type=str, default=None)
parser_pre.add_argument("--models-dir", type=str, default=None)
cmd_opts_pre = parser_pre.parse_known_args(shlex.split(os.environ.get("COMMANDLINE_ARGS", "")))[0]
if cmd_opts_pre.data_dir is None:
    cmd_opts_pre.data_dir = tempfile.mkdtemp(prefix="webui-standin-")
    atexit.register(shutil.rmtree, cmd_opts_pre.data_dir, True)

data_path = cmd_opts_pre.data_dir
models_path = cmd_opts_pre.models_dir if cmd_opts_pre.models_dir else os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
default_output_dir = os.path.join(data_path, "outputs")
