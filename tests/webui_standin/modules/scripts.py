"""modules/scripts.py: Script, AlwaysVisible, basedir(), load_scripts(), ScriptRunner (per-generation hooks).
Gradio UI building is left out: after initialize_scripts() a test sets each script's args_from/args_to into
p.script_args itself (the WebUI puts the selected-script index at 0, then each script's ui() values)."""
import inspect
import os
import sys
from collections import namedtuple

from modules import shared, paths, script_callbacks, extensions, script_loading, errors

AlwaysVisible = object()


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        """kwargs: batch_number, prompts (still WITH extra-network tags), seeds, subseeds"""

    def after_extra_networks_activate(self, p, *args, **kwargs):
        """called from extra_networks.activate(): kwargs batch_number, prompts, seeds, subseeds, extra_network_data"""

    def process_before_every_sampling(self, p, *args, **kwargs):
        """kwargs: x, noise, c, uc; called before the first pass and again before the hires pass"""

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def describe(self):
        return ""


current_basedir = paths.script_path


def basedir():
    """the extension's folder while its scripts/*.py module is being executed, else the WebUI root"""
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
scripts_txt2img = None
scripts_img2img = None


def list_scripts(scriptdirname, extension, *, include_extensions=True):
    root = os.path.join(paths.script_path, scriptdirname)
    res = [ScriptFile(paths.script_path, f, os.path.join(root, f)) for f in sorted(os.listdir(root))
           if os.path.splitext(f)[1].lower() == extension] if os.path.isdir(root) else []
    for ext in (extensions.active() if include_extensions else []):
        res += ext.list_files(scriptdirname, extension)
    return res


def load_scripts():
    global current_basedir, scripts_txt2img, scripts_img2img
    scripts_data.clear()
    script_callbacks.clear_callbacks()
    syspath = sys.path
    for scriptfile in list_scripts("scripts", ".py"):
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            module = script_loading.load_module(scriptfile.path)
            for script_class in module.__dict__.values():
                if inspect.isclass(script_class) and issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
        except Exception:
            errors.report(f"Error loading script: {scriptfile.filename}", exc_info=True)
        finally:
            sys.path = syspath
            current_basedir = paths.script_path
    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue
            script.filename = script_data.path
            script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def ordered_scripts(self, method_name):
        # only always-visible scripts whose class overrides the method, in load order
        return [s for s in self.alwayson_scripts if getattr(s.__class__, method_name, None) != getattr(Script, method_name, None)]

    def _call(self, method_name, p, *args, **kwargs):
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *args, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def setup_scrips(self, p, *, is_ui=True):
        for script in self.ordered_scripts('setup'):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script.setup(p, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._call('before_process', p)

    def process(self, p):
        self._call('process', p)

    def before_process_batch(self, p, **kwargs):
        self._call('before_process_batch', p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._call('after_extra_networks_activate', p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._call('process_batch', p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._call('process_before_every_sampling', p, **kwargs)

    def before_hr(self, p):
        self._call('before_hr', p)

    def postprocess_batch(self, p, images, **kwargs):
        self._call('postprocess_batch', p, images=images, **kwargs)

    def postprocess_image(self, p, pp):
        self._call('postprocess_image', p, pp)

    def postprocess(self, p, processed):
        self._call('postprocess', p, processed)

    def run(self, p, *args):
        script_index = args[0] if args else 0
        if not script_index:
            return None
        script = self.selectable_scripts[script_index - 1]
        return script.run(p, *args[script.args_from:script.args_to])
