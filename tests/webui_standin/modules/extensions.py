"""modules/extensions.py: every folder of extensions/ is an extension (metadata.ini ordering left out)."""
import os

from modules import shared
from modules.paths_internal import extensions_dir, extensions_builtin_dir

extensions = []
extension_paths = {}


def active():
    if shared.cmd_opts.disable_all_extensions or shared.opts.disable_all_extensions == "all":
        return []
    if shared.cmd_opts.disable_extra_extensions or shared.opts.disable_all_extensions == "extra":
        return [x for x in extensions if x.enabled and x.is_builtin]
    return [x for x in extensions if x.enabled]


class Extension:
    def __init__(self, name, path, enabled=True, is_builtin=False, metadata=None):
        self.name = name
        self.path = path
        self.enabled = enabled
        self.is_builtin = is_builtin
        self.canonical_name = name.lower().strip()

    def list_files(self, subdir, extension):
        from modules import scripts
        dirpath = os.path.join(self.path, subdir)
        if not os.path.isdir(dirpath):
            return []
        res = [scripts.ScriptFile(self.path, filename, os.path.join(dirpath, filename)) for filename in sorted(os.listdir(dirpath))]
        return [x for x in res if os.path.splitext(x.path)[1].lower() == extension and os.path.isfile(x.path)]


def list_extensions():
    extensions.clear()
    extension_paths.clear()
    for dirname, is_builtin in ((extensions_builtin_dir, True), (extensions_dir, False)):
        if not os.path.isdir(dirname):
            continue
        for name in sorted(os.listdir(dirname)):
            path = os.path.join(dirname, name)
            if os.path.isdir(path):
                extension = Extension(name, path, enabled=name not in shared.opts.disabled_extensions, is_builtin=is_builtin)
                extensions.append(extension)
                extension_paths[extension.path] = extension


def find_extension(filename):
    parentdir = os.path.dirname(os.path.realpath(filename))
    while parentdir != filename:
        extension = extension_paths.get(parentdir)
        if extension is not None:
            return extension
        filename = parentdir
        parentdir = os.path.dirname(filename)
    return None
