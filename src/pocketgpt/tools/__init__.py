"""Tools the model can call: each is a `toolloop.Tool`, a function of the call's arguments that returns text.

python.py    `python`: runs model-written code in a sandbox and returns what it printed
"""


def clip(text: str, limit: int) -> str:
    """At most about `limit` characters of a tool's output: its beginning and its end, which is where a
    traceback says what went wrong, with how much was left out between them."""
    if len(text) <= limit:
        return text
    head = limit // 2
    return f"{text[:head]}\n... (truncated {len(text) - limit} characters) ...\n{text[head - limit:]}"
