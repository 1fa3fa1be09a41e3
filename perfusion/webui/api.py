"""HTTP routes on the WebUI's FastAPI app, behind the same --api-auth credentials as /sdapi.

    GET  /perfusion/v1/concepts   every concept file with its metadata
    POST /perfusion/v1/refresh    rescan the concepts folder; returns the same list
"""

from secrets import compare_digest
from typing import Any

from modules import shared

from . import host, network
from .page import concept_metadata

ROUTES = ("/perfusion/v1/concepts", "/perfusion/v1/refresh")


def concepts() -> dict:
    """The payload of both routes."""
    lib = network.library()
    items = []
    for name in sorted(lib.entries, key=str.lower):
        entry = lib.entries[name]
        items.append({"name": name, "path": str(entry.path), "shorthash": entry.shorthash,
                      "tag": f"<perfusion:{name}>", "metadata": concept_metadata(entry),
                      "preferences": network.user_preferences(entry)})
    return {"folder": str(host.concepts_folder()), "concepts": items, "problems": list(lib.clashes)}


def refresh() -> dict:
    network.library().refresh()
    return concepts()


def credentials() -> dict[str, str]:
    """{user: password} from --api-auth ("user:pass,user2:pass2"), as the WebUI's own API reads it."""
    pairs = [item.split(":", 1) for item in (shared.cmd_opts.api_auth or "").split(",") if ":" in item]
    return {user: password for user, password in pairs}


def on_app_started(demo: Any, app: Any) -> None:
    """script_callbacks.on_app_started: add the routes once per app (a reloaded UI gets the same app)."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    def authenticate(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        known = credentials()
        if given.username in known and compare_digest(given.password, known[given.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    present = {getattr(r, "path", None) for r in app.routes}
    dependencies = [Depends(authenticate)] if shared.cmd_opts.api_auth else []
    for path, fn, method in zip(ROUTES, (concepts, refresh), ("GET", "POST")):
        if path not in present:
            app.add_api_route(path, fn, methods=[method], dependencies=dependencies)
