"""Stand-in of comfy.utils: dotted attribute access."""


def get_attr(obj, attr: str):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr: str, value):
    *parents, last = attr.split(".")
    for name in parents:
        obj = getattr(obj, name)
    prev = getattr(obj, last)
    setattr(obj, last, value)
    return prev
