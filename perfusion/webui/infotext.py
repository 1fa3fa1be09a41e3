"""The image's generation parameters: what is written, and what pasting them back does.

The infotext holds `Perfusion: hugsy tau=0.15 beta=0.6 lock=local; ...` (what was applied),
`Perfusion hashes: hugsy: 1a2b3c4d5e6f, ...`, `Perfusion defaults: beta=0.7 tau=0.15 ...` (the accordion) and,
for several concepts composed regionally, `Perfusion regions: places` and `Perfusion blend: prediction` (the settings'
own infotext names: pasting offers them as override settings where they differ, as the WebUI does for Clip
skip). On paste, a tag whose concept is known here under another name (same hash) is renamed; a concept missing
here is reported; a gate value that came from card preferences (not from the tag) is written into the tag so the
image reproduces elsewhere.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from .log import log
from .resolve import Defaults
from .state import Applied, library, runtime
from .tags import TAG

CONCEPTS = "Perfusion"
HASHES = "Perfusion hashes"
DEFAULTS = "Perfusion defaults"
REGIONS = "Perfusion regions"
BLEND = "Perfusion blend"


def forget(p: Any) -> None:
    """Drop this extension's keys from the image's parameters: the X/Y/Z script shares one dict among its
    cells, and a cell without concepts must not report the previous cell's."""
    params = getattr(p, "extra_generation_params", None)
    if params is None:  # the WebUI's dummy job while a model loads
        return
    for key in (CONCEPTS, HASHES, DEFAULTS, REGIONS, BLEND):
        params.pop(key, None)


def record(p: Any, applied: list[Applied], defaults: Defaults) -> None:
    """What was applied, the files' hashes and the accordion's values, into the image's parameters (and the regions
    and blend of the regional composition on the U-Net, if any)."""
    text = "; ".join(a.describe() for a in applied)
    for key in (REGIONS, BLEND):  # recorded again below where they still hold
        p.extra_generation_params.pop(key, None)
    if len(applied) > 1:
        text += f"; composition={defaults.composition}"
        if defaults.composition == "together":
            text += f" projection={defaults.projection}"
    if runtime.regional is not None:  # every time: the WebUI's API applies a pasted infotext without the paste callback
        p.extra_generation_params[REGIONS] = runtime.regional.regions
        p.extra_generation_params[BLEND] = runtime.regional.blend
    p.extra_generation_params[CONCEPTS] = text
    p.extra_generation_params[HASHES] = ", ".join(f"{a.entry.name}: {a.entry.shorthash}" for a in applied)
    p.extra_generation_params[DEFAULTS] = defaults_text(defaults)


def defaults_text(d: Defaults) -> str:
    return f"beta={d.beta:g} tau={d.tau:g} lock={d.lock} projection={d.projection} composition={d.composition}"


def parse_defaults(text: Optional[str]) -> dict[str, str]:
    """{'beta': '0.7', ...} from an infotext's "Perfusion defaults" value ({} when absent)."""
    return dict(re.findall(r"(\w+)=([^\s]+)", text or ""))


def parse_hashes(text: Optional[str]) -> dict[str, str]:
    """{name: shorthash} from a "Perfusion hashes" value."""
    out = {}
    for part in (text or "").split(","):
        name, _, shorthash = part.strip().rpartition(":")
        if name.strip() and shorthash.strip():
            out[name.strip()] = shorthash.strip()
    return out


def parse_applied(text: Optional[str]) -> dict[str, dict[str, str]]:
    """{name: {"tau": ..., "beta": ..., "lock": ...}} from a "Perfusion" value."""
    out = {}
    for part in (text or "").split(";"):
        words = part.split()
        if words and "=" not in words[0]:
            out[words[0]] = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    return out


def _explicit(prompt: str, name: str, applied: dict[str, str], defaults: dict[str, str]) -> str:
    """The tags of `name` with the applied beta/lock written in where the tag left them to defaults that
    differ (e.g. card preferences)."""

    def fix(m: re.Match) -> str:
        if m.group(1) != name:
            return m.group(0)
        items = [i for i in m.group(2).split(":") if i]
        positional = [i for i in items if "=" not in i]
        named = {i.split("=", 1)[0].strip().lower() for i in items if "=" in i}
        add = []
        if (
            "beta" in applied
            and len(positional) < 2
            and "beta" not in named
            and applied["beta"] != defaults.get("beta")
        ):
            add.append(f"beta={applied['beta']}")
        if "tau" in applied and not positional and "tau" not in named and applied["tau"] != defaults.get("tau"):
            add.append(f"tau={applied['tau']}")
        if "lock" in applied and "lock" not in named and applied["lock"] != defaults.get("lock"):
            add.append(f"lock={applied['lock']}")
        return f"<perfusion:{name}{''.join(':' + a for a in add)}{m.group(2)}>" if add else m.group(0)

    return TAG.sub(fix, prompt)


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """script_callbacks.on_infotext_pasted: rewrite params["Prompt"] in place, warn on the console."""
    hashes = parse_hashes(params.get(HASHES))
    if not hashes and CONCEPTS not in params:
        return
    prompt = params.get("Prompt", "")
    lib = library()
    lib.refresh()
    defaults = parse_defaults(params.get(DEFAULTS))
    for name, values in parse_applied(params.get(CONCEPTS)).items():
        prompt = _explicit(prompt, name, values, defaults)
    for name, shorthash in hashes.items():
        entry = lib.find(name)
        if entry is not None and entry.sha256.startswith(shorthash.lower()):
            continue
        other = lib.by_hash(shorthash)
        if other is not None:
            prompt = re.sub(rf"<perfusion:{re.escape(name)}(?=[:>])", f"<perfusion:{other.name}", prompt)
            log.warning(f"pasted concept {name} ({shorthash}) is {other.name} here; tag renamed")
        elif entry is not None:
            log.warning(
                f"pasted concept {name} was {shorthash}, the local file is {entry.shorthash} "
                "(another version); the image may differ"
            )
        else:
            log.warning(
                f"pasted concept {name} ({shorthash}) is not in {lib.folders[0]}; "
                "its tag will be skipped until the file is there"
            )
    params["Prompt"] = prompt
