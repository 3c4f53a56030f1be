"""What any JSON body the HTTP side reads must be before its fields are: text protobuf can
carry, nested within bounds. Pure.

JSON's \\ud800 escapes make lone surrogates, which no protobuf string (and no UTF-8) can
hold; nesting without bound exhausts recursion. Either was a 500 with tracebacks; now it is a
400 naming where. One pass over the body, without recursion.
"""

from __future__ import annotations

# JSON nested deeper than this is refused (no request needs it).
MAX_DEPTH = 64


def body_problem(body: object) -> tuple[str, str | None] | None:
    """(what is wrong, the parameter it is at) or None."""
    stack: list[tuple[object, str, int]] = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"the body nests deeper than {MAX_DEPTH} levels (at {where[:60]}...)", None
        if isinstance(value, str):
            problem = text_problem(value, where)
        elif isinstance(value, dict):
            problem = next((p for key in value if (p := text_problem(key, f"{where} key"))), None)
            stack.extend((item, f"{where}.{key}" if where else key, depth + 1)
                         for key, item in value.items())  # fmt: skip
        elif isinstance(value, list):
            problem = None
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        else:
            problem = None
        if problem is not None:
            return problem
    return None


def text_problem(text: str, where: str) -> tuple[str, str | None] | None:
    try:
        text.encode()
    except UnicodeEncodeError:
        what = where or "the body"
        return f"{what} is not valid Unicode text (a lone surrogate such as \\ud800)", where or None
    return None
