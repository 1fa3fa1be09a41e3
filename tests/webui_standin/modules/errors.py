"""modules/errors.py: the WebUI prints and records exceptions instead of raising them."""
import sys
import traceback

exception_records = []


def record_exception():
    _, e, tb = sys.exc_info()
    if e is None:
        return
    exception_records.append({"exception": str(e), "type": type(e).__name__,
                              "traceback": [[f"{x.filename}, line {x.lineno}, {x.name}", x.line] for x in traceback.extract_tb(tb)]})
    # the real module keeps 5; the stand-in keeps all so tests can assert none happened


def report(message: str, *, exc_info: bool = False) -> None:
    record_exception()
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(traceback.format_exc(), file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    record_exception()
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    print(*traceback.TracebackException.from_exception(e).format(), sep="", file=sys.stderr)


already_displayed = {}


def display_once(e: Exception, task):
    record_exception()
    if task not in already_displayed:
        display(e, task)
        already_displayed[task] = 1
