"""modules/progress.py: task bookkeeping behind /internal/progress (the HTTP route itself is left out)."""
import random
import string
import time
from collections import OrderedDict

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
recorded_results = []
recorded_results_limit = 2


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def create_task_id(task_type):
    return f"task({task_type}-{''.join(random.choices(string.ascii_uppercase + string.digits, k=7))})"


def record_results(id_task, res):
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        recorded_results.pop(0)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


def progress_response(id_task, id_live_preview: int = -1, live_preview: bool = True) -> dict:
    """What POST /internal/progress answers (ProgressResponse's fields): active/queued/completed, progress
    0..1 from job_no/job_count and sampling steps, eta in s, textinfo, the live preview as a data: URI."""
    from modules import shared
    active, queued, completed = id_task == current_task, id_task in pending_tasks, id_task in finished_tasks
    if not active:
        return dict(active=False, queued=queued, completed=completed, progress=None, eta=None, live_preview=None,
                    id_live_preview=-1, textinfo="Waiting...")
    state, progress = shared.state, 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
        if state.sampling_steps > 0:
            progress += state.sampling_step / state.sampling_steps / state.job_count
    progress = min(progress, 1.0)
    elapsed = time.time() - state.time_start
    eta = elapsed / progress - elapsed if progress > 0 else None
    preview = None
    if live_preview and state.current_image is not None and state.id_live_preview != id_live_preview:
        import base64
        import io
        buffer = io.BytesIO()
        state.current_image.save(buffer, format="png")
        preview = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        id_live_preview = state.id_live_preview
    return dict(active=True, queued=queued, completed=completed, progress=progress, eta=eta, live_preview=preview,
                id_live_preview=id_live_preview, textinfo=state.textinfo)


def setup_progress_api(app):
    """The WebUI adds this route to gradio's app after launch."""
    from fastapi import Body

    def progressapi(id_task: str = Body(None, embed=True), id_live_preview: int = Body(-1, embed=True),
                    live_preview: bool = Body(True, embed=True)):
        return progress_response(id_task, id_live_preview, live_preview)

    app.add_api_route("/internal/progress", progressapi, methods=["POST"])
