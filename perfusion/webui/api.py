"""HTTP routes on the WebUI's FastAPI app, behind the same --api-auth credentials as /sdapi.

GET  /perfusion/v1/concepts       every concept file with its metadata (rescanned if the folder changed)
POST /perfusion/v1/refresh        rescan the concepts folder; returns the same list
POST /perfusion/v1/train          start training (the tab's fields as JSON); 422 lists every problem
GET  /perfusion/v1/train/status   state, step, total, loss, ETA, message
"""

import math
import threading
from dataclasses import asdict
from secrets import compare_digest
from typing import Any

from . import host, training
from .page import concept_metadata
from .state import library
from .training import FormError, TrainForm

ROUTES = ("/perfusion/v1/concepts", "/perfusion/v1/refresh", "/perfusion/v1/train", "/perfusion/v1/train/status")


def concepts() -> dict:
    """The payload of both routes (a concept trained or copied in since the last scan is listed)."""
    lib = library()
    lib.refresh_if_changed()
    items = []
    for name in sorted(lib.entries, key=str.lower):
        entry = lib.entries[name]
        metadata = concept_metadata(entry)
        items.append(
            {
                "name": name,
                "path": str(entry.path),
                "shorthash": entry.shorthash,
                "tag": f"<perfusion:{name}>",
                "usable": "error" not in metadata,
                "problem": metadata.get("error"),
                "metadata": metadata,
                "preferences": host.card_preferences(entry.path),
            }
        )
    return {"folder": str(host.concepts_folder()), "concepts": items, "problems": list(lib.clashes)}


def refresh() -> dict:
    library().refresh()
    return concepts()


def start_training(body: dict) -> dict:
    """Check the form now (422 with every problem), then train in a thread that waits for the WebUI's
    queue lock like any generation (409 while one is queued or runs)."""
    from fastapi import HTTPException

    try:
        form = TrainForm.from_dict(body)
    except FormError as e:
        raise HTTPException(status_code=422, detail=e.problems) from None
    with _starting:  # one request at a time between this check and the status change below
        if training.status.state in ("queued", "training"):
            raise HTTPException(status_code=409, detail=[f"already {training.status.state}: {training.status.name}"])
        problems, _ = training.check(form)  # outside the queue lock: a checkpoint not loaded yet loads in the job
        if problems:
            raise HTTPException(status_code=422, detail=problems)
        training.status = training.Status("queued", form.name)
    threading.Thread(target=_train_in_queue, args=(form,), daemon=True).start()
    return {"started": form.name}


_starting = threading.Lock()


def _train_in_queue(form: TrainForm) -> None:
    from modules.call_queue import queue_lock

    with queue_lock:
        host.job_state().begin(job="perfusion_train")
        try:
            training.train(form)
        except Exception as e:  # reported through the status route, never lost in a thread
            training.status = training.Status("failed", form.name, message=f"{type(e).__name__}: {e}")
        finally:
            host.job_state().end()


def training_status() -> dict:
    """The status as JSON-safe values (a NaN or infinite loss becomes null: JSON has no NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(training.status).items()}


def credentials() -> dict[str, str]:
    """{user: password} from --api-auth ("user:pass,user2:pass2"), as the WebUI's own API reads it."""
    pairs = [item.split(":", 1) for item in host.api_auth().split(",") if ":" in item]
    return {user: password for user, password in pairs}


def on_app_started(demo: Any, app: Any) -> None:
    """script_callbacks.on_app_started: add the routes once per app (a reloaded UI gets the same app)."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    def authenticate(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        known = credentials()
        if given.username in known and compare_digest(given.password, known[given.username]):
            return True
        raise HTTPException(
            status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
        )

    present = {getattr(r, "path", None) for r in app.routes}
    dependencies = [Depends(authenticate)] if host.api_auth() else []
    handlers = (concepts, refresh, start_training, training_status)
    for path, fn, method in zip(ROUTES, handlers, ("GET", "POST", "POST", "GET")):
        if path not in present:
            app.add_api_route(path, fn, methods=[method], dependencies=dependencies)
