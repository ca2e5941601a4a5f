"""JSON Schema on llguidance: the spec's semantics, checked model-free (byte by byte) against
`jsonschema`, the reference validator."""

import json

import pytest

from steer import SteerError
from steer.constraints.engine import json_schema, literal_runs, schema_validator

CASES = [
    # (schema, instances): every instance is judged by the constraint and by jsonschema alike
    ({"type": "object", "properties": {"a": {"type": "integer"}}},
     [{"a": 1}, {"a": 1, "b": "x"}, {"b": True}, {"a": "1"}, {}]),  # additionalProperties defaults to allowed
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a", "b"]},
     [{"a": 1, "b": "x"}, {"a": 1}, {"a": 1, "b": "x", "c": None}]),  # keys in the schema's order
    ({"type": "string", "pattern": "[0-9]{2}"}, ["a12b", "12", "a1b2"]),  # pattern is a search
    ({"type": "string", "pattern": "^pkg:"}, ["pkg:npm", "npm:pkg"]),  # half-anchored
    ({"type": "string", "maxLength": 3}, ["\u00e9t\u00e9", "abcd", "ab"]),  # escapes count as one character
    ({"type": "number", "minimum": 0.5, "maximum": 2}, [0.5, 2, 2.5, 0.25, 1]),
    ({"type": "integer", "exclusiveMinimum": 3}, [3, 4, -1]),
    ({"definitions": {"p": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/definitions/p"}},
     [[1, 2], [1, "a"], []]),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, [1, "a", None]),
    ({"allOf": [{"type": "object", "required": ["a"]}, {"type": "object", "required": ["b"]}]},
     [{"a": 1, "b": 2}, {"a": 1}]),
    ({"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
     [{"x_a": 1}, {"x_a": "1"}, {"y": 1}]),
    ({"$id": "http://example.com/s", "$comment": "annotations are ignored", "title": "T", "readonly": True,
      "javaType": "x.Y", "type": "boolean"}, [True, 1]),
    ({}, [1, "a", None, [1, {"a": []}], {"b": 1.5}]),  # any value
]


@pytest.mark.parametrize("schema,instances", CASES)
def test_agrees_with_jsonschema(schema, instances):
    constraint = json_schema(schema)
    valid = schema_validator(schema)
    for instance in instances:
        text = json.dumps(instance)
        assert constraint.matches(text) == valid(text), (schema, text)


def test_numbers_cannot_run_on_forever():
    # the generated text is json.dumps's: no spaces after it ends, nothing after the document
    record = json_schema({"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]})
    assert record.matches('{"x": -0.5}')
    assert not record.matches('{"x": -0.5} ')
    assert not record.matches('{"x":-0.5}')  # json.dumps's separators


def test_unsupported_keyword_names_it_and_its_path():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(SteerError, match=r"uniqueItems.*\$\.properties\.tags"):
        json_schema(schema)


def test_lenient_mode_checks_the_complete_text():
    schema = {"type": "array", "items": {"type": "integer"}, "maxItems": 3, "uniqueItems": True}
    lenient = json_schema(schema, lenient=True)
    assert lenient.final_check is not None
    assert lenient.matches("[1, 2, 3]")
    assert not lenient.matches("[1, 1]")  # the mask allows it; the final check does not


def test_a_schema_that_lists_its_values_is_masked_exactly():
    """Where the schema lists every value it may take (enums under oneOf and a $ref), the listed values
    that pass `jsonschema` are the mask: `if`/`then` and `multipleOf` on the items, which the mask
    cannot express, leave only [6, 8], and nothing is left to a final check that particles would die at."""
    schema = {"type": "array", "oneOf": [{"$ref": "#/definitions/x"}, {"$ref": "#/definitions/z"}],
              "if": {"minItems": 1}, "then": {"minItems": 2, "items": {"multipleOf": 2}},
              "definitions": {"x": {"enum": [[2], [2, 4], [6]]}, "z": {"enum": [[1], [2, 4], [6, 8]]}}}
    constraint = json_schema(schema, lenient=True)
    assert constraint.final_check is None
    assert constraint.matches("[6, 8]")
    for other in ([2], [2, 4], [6], [1]):  # listed, each fails the schema: [2, 4] is in both oneOf branches
        assert not constraint.matches(json.dumps(other)), other
    assert json_schema({"enum": [1, True]}).matches("true")  # 1 == True in Python, not in JSON
    with pytest.raises(SteerError, match="allows no document"):
        json_schema({"enum": [1, 2], "not": {"enum": [1, 2]}}, lenient=True)


@pytest.mark.parametrize("pattern,runs", [
    (r"^file:.+\.tpkx?$", ("file:", ".tpk")),  # an optional character leaves the run
    (r"(?:foo|bar)-\d{3}", ("foo", "bar")),  # group flags and classes are no literals
    (r"[a-z]{2}\.com|colou?r", (".com", "colo")),
    (r"\p{Lu}xy{0,2}z", ()),  # `y{0,2}` may be absent: no two-letter run is certain
])
def test_literal_runs_of_a_pattern(pattern, runs):
    assert literal_runs([pattern]) == runs


@pytest.mark.parametrize("schema,message", [
    ('{"type": ', "not valid JSON"),
    ({"type": "tuple"}, r"invalid JSON schema at \$"),
    ({"properties": {"a": {"$ref": "#/definitions/missing"}}}, "does not exist"),
    ([1, 2], "is an object"),
])
def test_bad_schemas_are_one_line_errors(schema, message):
    with pytest.raises(SteerError, match=message) as e:
        json_schema(schema)
    assert "\n" not in str(e.value)


def test_any_key_order_accepts_every_order_and_checks_required_at_the_end():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b.c": {"type": "string"}},
              "required": ["a", "b.c"], "additionalProperties": False}
    strict, free = json_schema(schema), json_schema(schema, key_order="any")
    assert strict.matches('{"a": 1, "b.c": "x"}') and not strict.matches('{"b.c": "x", "a": 1}')
    assert free.matches('{"a": 1, "b.c": "x"}') and free.matches('{"b.c": "x", "a": 1}')
    assert not free.matches('{"b.c": "x"}')  # required, at the final check
    assert not free.matches('{"a": 1, "a": 2, "b.c": "x"}')  # a duplicate key
    assert not free.matches('{"a": 1, "bxc": "x"}')  # the key is matched exactly, "." included
    assert not free.allows('{"a": "1"')  # the values' schemas stay in the mask


def test_integers_stay_in_the_interoperable_range():
    record = json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    assert record.matches('{"n": 9007199254740991}') and record.matches('{"n": -9007199254740991}')
    assert not record.matches('{"n": 9007199254740992}')
    assert not record.allows('{"n": 12345678901234567')  # a 17th digit is refused at once
    bounded = json_schema({"type": "integer", "minimum": 0})
    assert bounded.matches("5") and not bounded.matches("-5") and not bounded.matches("9" * 17)


def test_boolean_schemas():
    assert json_schema(True).matches('{"a": [1, null]}')
    with pytest.raises(SteerError, match="allows no document"):
        json_schema(False)


def test_properties_spelt_like_keywords():
    schema = {"type": "object", "properties": {"required": {"type": "boolean"}, "properties": {"type": "integer"},
                                               "type": {"type": "string"}}, "required": ["required"]}
    for order in ("schema", "any"):
        record = json_schema(schema, key_order=order)
        assert record.matches('{"required": true, "properties": 3, "type": "x"}'), order
        assert not record.matches('{"required": 1}'), order


def test_decimal_counts_and_unicode_property_patterns():
    assert json_schema({"type": "array", "maxItems": 2.0}).matches("[1, 2]")
    assert not json_schema({"type": "array", "maxItems": 2.0}).matches("[1, 2, 3]")
    letters = json_schema({"type": "string", "pattern": "^\\p{Letter}+$"})  # not Python's syntax, still valid
    assert letters.matches('"abc"') and not letters.matches('"a1"')
