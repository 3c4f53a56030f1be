"""worker/schemas.py: which JSON schemas the engine's grammar can enforce, said by keyword,
and schemas closed to properties they do not list."""

from __future__ import annotations

from typing import Any

import pytest

from worker.schemas import MAX_DEPTH, closed, schema_problem


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}},
         "required": ["a"], "title": "A", "description": "d", "$schema": "x"},
        {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
        {"type": "array", "items": {"enum": [1, 2]}, "minItems": 1, "maxItems": 3},
        {"$defs": {"x": {"type": "string", "pattern": "^a+$"}}, "$ref": "#/$defs/x"},
        True,
    ],
)  # fmt: skip
def test_what_the_grammar_enforces_passes(schema: Any) -> None:
    assert schema_problem(schema) is None


@pytest.mark.parametrize(
    ("schema", "keyword", "where"),
    [
        ({"not": {"type": "string"}}, "'not'", "schema"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems'", "schema"),
        ({"properties": {"a": {"if": {}, "then": {}}}}, "'if'", "schema.properties.a"),
        ({"anyOf": [{"type": "object", "minProperties": 1}]}, "'minProperties'", "anyOf[0]"),
        ({"type": "string", "format": "credit-card"}, "'credit-card'", "schema.format"),
        ({"$ref": "https://example.com/s.json"}, "$ref", "schema.$ref"),
    ],
)  # fmt: skip
def test_what_it_cannot_is_named_with_where_it_is(schema: Any, keyword: str, where: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and keyword in problem and where in problem


def test_nesting_is_bounded() -> None:
    schema: Any = {"type": "string"}
    for _ in range(MAX_DEPTH + 2):
        schema = {"items": schema}
    assert "deeper" in (schema_problem(schema) or "")


def test_closed_objects_say_no_more_properties_unless_the_schema_allows_them() -> None:
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"x": {}}},
                       "free": {"type": "object", "properties": {}, "additionalProperties": True}},
        "required": ["properties"],
    }  # fmt: skip
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert out["properties"]["free"]["additionalProperties"] is True
    assert "additionalProperties" not in out["properties"]  # a property named so is not a schema
    assert "additionalProperties" not in schema  # the caller's schema is left as it was


def test_integers_without_bounds_get_llama_cpps_sixteen_digits() -> None:
    out = closed({"type": "object", "properties": {
        "n": {"type": "integer"}, "small": {"type": "integer", "maximum": 9},
        "either": {"type": ["integer", "null"]}, "x": {"type": "number"}}})  # fmt: skip
    props = out["properties"]
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (-(10**16 - 1), 10**16 - 1)
    assert props["small"]["maximum"] == 9 and props["small"]["minimum"] == -(10**16 - 1)
    assert props["either"]["maximum"] == 10**16 - 1
    assert "maximum" not in props["x"]  # numbers are left as they are
