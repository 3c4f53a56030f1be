"""Which JSON schemas the engine's grammar can enforce. Pure.

llama.cpp compiles a JSON schema into a grammar with llguidance, whose converter covers a
subset of JSON Schema (draft 2020-12): the keywords in SUPPORTED. A schema using any other
keyword would not be enforced as written (the engine drops a grammar it cannot build and
samples freely), so such a schema is refused before it reaches the engine, naming the
keyword and where it is.
"""

from __future__ import annotations

from typing import Any

# Keywords llguidance's converter carries out.
SUPPORTED = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "properties", "additionalProperties", "required", "patternProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})  # fmt: skip
# Keywords that only describe: they constrain nothing, so nothing is lost.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "$anchor",
})  # fmt: skip
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4",
                     "ipv6", "uuid"})  # fmt: skip
# Keywords whose value is a schema, a list of schemas, or a name -> schema map.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")  # fmt: skip
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# How the grammar writes JSON: ", " and ": " and no other whitespace (llguidance's x-guidance).
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Nesting beyond this is refused (a schema is untrusted input; recursion must be bounded).
MAX_DEPTH = 64


def schema_problem(schema: Any, where: str = "schema") -> str | None:
    """Why the grammar cannot enforce `schema` (None: it can), naming the keyword."""
    return _walk(schema, where, 0)


def _walk(schema: Any, where: str, depth: int) -> str | None:
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"{where} must be a JSON schema object (got {type(schema).__name__})"
    if depth > MAX_DEPTH:
        return f"{where} nests deeper than {MAX_DEPTH} levels"
    for key, value in schema.items():
        if key in ANNOTATIONS or key.startswith("x-"):
            continue
        if key not in SUPPORTED:
            return (f"{where} uses the keyword {key!r}, which the grammar cannot enforce; "
                    f"supported keywords: {', '.join(sorted(SUPPORTED))}")  # fmt: skip
        if key == "format" and value not in FORMATS:
            return (f"{where}.format {value!r} cannot be enforced; supported formats: "
                    f"{', '.join(sorted(FORMATS))}")  # fmt: skip
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            return f"{where}.$ref {value!r} is not a reference inside the schema (#/...)"
        problem = _children(key, value, f"{where}.{key}", depth + 1)
        if problem:
            return problem
    return None


def _children(key: str, value: Any, where: str, depth: int) -> str | None:
    if key in _ONE:
        return _walk(value, where, depth)
    if key in _LIST:
        if not isinstance(value, list):
            return f"{where} must be an array of schemas"
        return next((p for i, s in enumerate(value) if (p := _walk(s, f"{where}[{i}]", depth))),
                    None)  # fmt: skip
    if key in _MAP:
        if not isinstance(value, dict):
            return f"{where} must be an object of schemas"
        return next((p for k, s in value.items() if (p := _walk(s, f"{where}.{k}", depth))),
                    None)  # fmt: skip
    return None


# An integer without bounds gets at most this many digits, as llama.cpp's own converter
# writes integers (measured: sampled at 0.8, SmolLM2 ran 7 of 30 unbounded integers on until
# max_tokens).
MAX_DIGITS = 16


def closed(schema: Any) -> Any:
    """`schema` as the grammar is to hold it, as llama.cpp's own converter does by default:
    every object that lists its properties closed to others unless it says otherwise
    (additionalProperties, patternProperties), and every integer without bounds within
    MAX_DIGITS digits. A small model left free tends to add properties or digits until
    max_tokens; every answer still validates against the schema as given."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _ONE:
            out[key] = closed(value)
        elif key in _LIST and isinstance(value, list):
            out[key] = [closed(item) for item in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: closed(item) for name, item in value.items()}
    if "properties" in out and not {"additionalProperties", "patternProperties"} & set(out):
        out["additionalProperties"] = False
    kind = out.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind and "number" not in kind):
        largest = 10**MAX_DIGITS - 1
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = largest
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -largest
    return out
