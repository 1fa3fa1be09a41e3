"""The extension's console messages: one logger, written where the WebUI writes its own console lines."""

from __future__ import annotations

import logging
import sys


class _Console(logging.StreamHandler):
    """A handler on whatever sys.stdout is when a message is written (the WebUI's console; a test's capture)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("Perfusion: %(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ sets it; the property always answers sys.stdout
        pass


log = logging.getLogger("perfusion")
if not any(isinstance(h, _Console) for h in log.handlers):  # the module may be imported again (Reload UI)
    log.addHandler(_Console())
    log.setLevel(logging.INFO)
    log.propagate = False
