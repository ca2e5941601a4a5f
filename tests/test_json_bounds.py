"""JSON-schema integer bounds as exact digit patterns, and numbers that cannot run on forever."""

import random

import pytest
import regex

import steer
from steer.patterns import MAX_DIGITS, integer_pattern, json_schema


@pytest.mark.parametrize("lo,hi", [(0, 120), (-5, 7), (-120, -3), (13, 13), (0, 0), (1, 999), (98, 1203),
                                   (None, 50), (-1000, None), (None, None)])
def test_integer_pattern_matches_exactly_the_range(lo, hi):
    pattern = integer_pattern(lo, hi)
    limit = 10 ** MAX_DIGITS - 1
    low, high = (-limit if lo is None else lo), (limit if hi is None else hi)
    rng = random.Random(0)
    candidates = list(range(-2500, 2500)) + [low - 1, low, high, high + 1, limit + 1, -limit - 1]
    candidates += [rng.randint(-limit, limit) for _ in range(2000)]
    for n in candidates:
        assert (regex.fullmatch(pattern, str(n)) is not None) == (low <= n <= high), (lo, hi, n)
    for bad in ("-0", "007", "+1", "1.0", ""):
        assert regex.fullmatch(pattern, bad) is None


def test_schema_bounds_exclusive_bounds_and_refusals():
    age = json_schema({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
                       "required": ["age"]})
    assert [n for n in (-1, 0, 7, 120, 121) if age.matches(f'{{"age": {n}}}')] == [0, 7, 120]
    open_range = json_schema({"type": "object", "properties": {
        "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}, "required": ["n"]})
    assert [n for n in range(-2, 13) if open_range.matches(f'{{"n": {n}}}')] == list(range(1, 10))
    draft4 = json_schema({"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 3})
    assert [n for n in range(-1, 6) if draft4.matches(str(n))] == [1, 2, 3]
    with pytest.raises(steer.SteerError, match="supported on integers only"):
        json_schema({"type": "number", "minimum": 1})
    with pytest.raises(steer.SteerError, match="leave no value"):
        json_schema({"type": "integer", "minimum": 5, "maximum": 4})


def test_unbounded_numbers_cannot_run_on_forever():
    record = json_schema({"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}},
                          "required": ["n", "x"]})
    assert record.matches('{"n": ' + "9" * MAX_DIGITS + ', "x": -0.5}')
    assert not record.matches('{"n": ' + "9" * (MAX_DIGITS + 1) + ', "x": 1}')
    assert not record.matches('{"n": 1, "x": 1.' + "1" * 16 + "}")
    assert not record.matches('{"n": 1, "x": 1e+1234}')
