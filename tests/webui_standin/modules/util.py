"""modules/util.py: the helpers extension pages use."""
import os
import re


def natural_sort_key(s, regex=re.compile('([0-9]+)')):
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def listfiles(dirname):
    filenames = [os.path.join(dirname, x) for x in sorted(os.listdir(dirname), key=natural_sort_key) if not x.startswith(".")]
    return [file for file in filenames if os.path.isfile(file)]


def walk_files(path, allowed_extensions=None):
    from modules import shared
    if not os.path.exists(path):
        return
    allowed_extensions = set(allowed_extensions) if allowed_extensions is not None else None
    for root, _, files in sorted(os.walk(path, followlinks=True), key=lambda x: natural_sort_key(x[0])):
        for filename in sorted(files, key=natural_sort_key):
            if allowed_extensions is not None and os.path.splitext(filename)[1].lower() not in allowed_extensions:
                continue
            if not shared.opts.list_hidden_files and ("/." in root or "\\." in root):
                continue
            yield os.path.join(root, filename)


class MassFileListerCachedDir:
    def __init__(self, dirname):
        self.dirname = dirname
        files = []
        for entry in os.scandir(dirname):  # like the WebUI: a missing folder raises FileNotFoundError
            st = entry.stat(follow_symlinks=False)
            files.append((entry.name, st.st_mtime, st.st_ctime))
        self.files = {x[0].lower(): x for x in files}
        self.files_cased = {x[0]: x for x in files}

    def update_entry(self, filename):
        st = os.stat(os.path.join(self.dirname, filename))
        self.files[filename.lower()] = self.files_cased[filename] = (filename, st.st_mtime, st.st_ctime)


class MassFileLister:
    """Caches one listing per folder until reset(): files created after the first look-up stay invisible."""

    def __init__(self):
        self.cached_dirs = {}

    def find(self, path):
        dirname, filename = os.path.split(path)
        cached_dir = self.cached_dirs.get(dirname)
        if cached_dir is None:
            cached_dir = self.cached_dirs[dirname] = MassFileListerCachedDir(dirname)
        stats = cached_dir.files_cased.get(filename)
        if stats is not None:
            return stats
        if cached_dir.files.get(filename.lower()) is None:
            return None
        try:
            os_stats = os.stat(path, follow_symlinks=False)
            return filename, os_stats.st_mtime, os_stats.st_ctime
        except Exception:
            return None

    def exists(self, path):
        return self.find(path) is not None

    def mctime(self, path):
        stats = self.find(path)
        return (0, 0) if stats is None else stats[1:3]

    def reset(self):
        self.cached_dirs.clear()

    def update_file_entry(self, path):
        dirname, filename = os.path.split(path)
        if cached_dir := self.cached_dirs.get(dirname):
            cached_dir.update_entry(filename)


def topological_sort(dependencies):
    visited, result = {}, []

    def inner(name):
        visited[name] = True
        for dep in dependencies.get(name, []):
            if dep in dependencies and dep not in visited:
                inner(dep)
        result.append(name)

    for depname in dependencies:
        if depname not in visited:
            inner(depname)
    return result
