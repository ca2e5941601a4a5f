"""Every constraint kind on the real default model: all outputs satisfy the constraint, checked
independently, with and without a trailing space at the end of the prompt."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

import steer
from steer_lang import Script

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BOTH = pytest.mark.parametrize("trailing", ["", " "])


def outputs(gemma, name, trailing, particles=3, **inputs):
    script = Script.from_file(EXAMPLES / f"{name}.steer")
    prompt = inputs.pop("prompt", script.input_values()["prompt"]).rstrip() + trailing
    post = script.run(gemma, particles=particles, seed=0, inputs={"prompt": prompt, **inputs})
    texts = [p.result() for p, w in zip(post.particles, post.weights) if w > 0]
    assert texts
    return texts


@BOTH
@pytest.mark.parametrize("prompt,pattern,check", [
    ("For reservations, call us at", r" ?\(\d{3}\) \d{3}-\d{4}", r" ?\(\d{3}\) \d{3}-\d{4}"),
    ("The contract was signed on", r" ?(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", r" ?\d{4}-\d\d-\d\d"),
    ("For questions, write to us at", r" ?[a-z0-9._]{1,16}@[a-z0-9]{1,12}\.(com|org|net)", r" ?[^@\s]+@[^@\s]+\.[a-z]+"),
])
def test_regex_phone_date_email(gemma, trailing, prompt, pattern, check):
    for text in outputs(gemma, "phone_number", trailing, pattern=pattern, prompt=prompt):
        assert re.fullmatch(check, text), text


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                                      "team": {"enum": ["sales", "research", "support"]}},
     "required": ["name", "age", "team"], "additionalProperties": False},
    {"type": "object", "properties": {"product": {"type": "string", "maxLength": 20},
                                      "price": {"type": "number"},
                                      "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]},
                                               "maxItems": 2}},
     "required": ["product", "price", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"event": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 20}, "city": {"type": "string", "maxLength": 16}},
        "required": ["title", "city"], "additionalProperties": False},
        "online": {"type": "boolean"}}, "required": ["event", "online"], "additionalProperties": False},
]


def valid(value, schema):
    """A small independent JSON-schema check for the keywords used above."""
    kind = schema.get("type")
    if "enum" in schema:
        return value in schema["enum"]
    if kind == "object":
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and all(valid(value[k], s) for k, s in schema["properties"].items() if k in value))
    if kind == "array":
        return isinstance(value, list) and len(value) <= schema.get("maxItems", 10**9) and all(
            valid(v, schema["items"]) for v in value)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    raise AssertionError(schema)


@pytest.mark.parametrize("k,trailing", [(0, ""), (0, " "), (1, ""), (2, " ")])
def test_json_schema(gemma, k, trailing):
    prompts = ["Here is the record of the new employee, in JSON:", "Product listing as JSON:",
               "The conference, as a JSON object:"]
    for text in outputs(gemma, "json_object", trailing, schema=json.dumps(SCHEMAS[k]), prompt=prompts[k]):
        assert valid(json.loads(text), SCHEMAS[k]), text


@BOTH
def test_arithmetic_grammar(gemma, trailing):
    for text in outputs(gemma, "arithmetic", trailing):
        assert text.endswith("\n")
        tree = ast.parse(text.strip(), mode="eval")  # Python's own parser as the independent check
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), text
        assert re.fullmatch(r"[0-9+\-*/() ]+\n", text.lstrip()), text


@BOTH
def test_lipogram(gemma, trailing):
    for text in outputs(gemma, "lipogram", trailing, max_tokens=12):
        assert "e" not in text.lower(), text


@BOTH
def test_banned_words(gemma, trailing):
    banned = {"the", "a", "an", "and", "of", "to"}
    for text in outputs(gemma, "banned_words", trailing, max_tokens=12):
        assert not banned & {w.lower() for w in re.findall(r"[^\W\d_]+", text)}, text


@BOTH
def test_short_words(gemma, trailing):
    for text in outputs(gemma, "short_words", trailing, max_tokens=12):
        assert all(len(w) <= 5 for w in re.findall(r"[^\W\d_]+", text)), text


def test_bounded_integer_person_record(gemma):
    """An integer with bounds is an exact digit pattern, and a budget makes an open object close in
    time: every particle ends within 40 tokens (none dies), and every final record parses with its age
    in 0-120.  (The schema allows further keys, which the model adds: without the budget most particles
    ran past 40 tokens and died, leaving the run on one or two.)"""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}
    record = steer.patterns.json_schema(schema)
    post = steer.smc(steer.Generate(gemma, "Person record: ", 40, constraint=record), particles=8, seed=0)
    assert np.isfinite(post.log_weights).all()
    for p in post.particles:
        value = json.loads(p.context.text)
        assert valid(value, schema) and 0 <= value["age"] <= 120 and isinstance(value["age"], int)


def test_lenient_json_schema_is_exact_through_its_final_check(gemma):
    """`uniqueItems` is not in llguidance's mask: lenient mode leaves it to `jsonschema` on the complete
    text, so every particle that lives holds distinct items (a repeated colour would be allowed by the
    mask alone), and the weights stay finite."""
    import jsonschema

    schema = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3,
              "uniqueItems": True}
    with pytest.raises(steer.SteerError, match="uniqueItems"):
        steer.patterns.json_schema(schema)
    colours = steer.patterns.json_schema(schema, lenient=True)
    post = steer.smc(steer.Generate(gemma, "Two different colours as a JSON list:\n", 24, constraint=colours),
                     particles=8, seed=0)
    live = [p for p, w in zip(post.particles, post.log_weights) if w > float("-inf")]
    assert live and np.isfinite(post.log_ml)
    for p in live:
        jsonschema.validate(json.loads(p.context.text), schema)


def test_partial_regex_with_a_back_reference_on_the_default_model(gemma):
    """A back-reference is not regular: candidates come from llguidance's mask of the regular part and
    AWRS checks them; every final text repeats its word."""
    check = steer.checks.partial_regex(r" (\w+) \1")
    assert check.approximation is not None
    prompt = "Say it twice: bye bye\nSay it twice: go go\nSay it twice: stop stop\nSay it twice:"
    post = steer.smc(steer.Generate(gemma, prompt, 12, stop="\n", constraint=check), particles=4, seed=0)
    live = [p for p, w in zip(post.particles, post.log_weights) if w > float("-inf")]
    assert live
    for p in live:
        assert re.fullmatch(r" (\w+) \1", p.context.text), p.context.text


def test_a_budget_makes_a_word_mask_end_in_time_on_the_default_model(gemma):
    """A word mask under a tight budget with an end string: the look-ahead before the last token keeps
    every particle able to end, and every text keeps the mask; in `.steer` the same program gives the
    same log_ml (the same draws)."""
    constraint = steer.masks.word_length(min=2, max=5)
    post = steer.smc(steer.Generate(gemma, "Three short words:", 6, stop=".", constraint=constraint),
                     particles=6, seed=0)
    assert np.isfinite(post.log_weights).all()
    for particle in post.particles:
        words = re.findall(r"[^\W\d_]+", particle.result())
        assert all(2 <= len(w) <= 5 for w in words), particle.result()
    source = ('context c = "Three short words:", end = ".", max_tokens = 6\n'
              "repeat 6:\n"
              "    t = sample next(c) where word_length(min=2, max=5)\n"
              "    if t == eos:\n"
              "        stop\n"
              "result text(c)\n")
    steered = Script.from_source(source, "words.steer").run(gemma, particles=6, seed=0)
    assert steered.log_ml == pytest.approx(post.log_ml, rel=1e-9)


def test_the_completion_search_finds_a_fixed_ending_the_greedy_walk_misses(gemma):
    """The budget's completion search on Gemma's vocabulary: after ` 123456` under `\\w+ly` the greedy
    walk writes digits and finds no end; the fallback finds `ly`, so the budget check can force it."""
    from steer.constraints import engine

    constraint = engine.regex(r" \w+ly")
    matcher = constraint.matcher(gemma.vocab)
    assert matcher.consume_tokens(gemma.encode(" 123456", bos=False))
    tokenizer = engine.ll_tokenizer(gemma.vocab)
    assert engine._greedy_walk(matcher, engine.probe_tokens(gemma.vocab), tokenizer, 76, "56")[1] is False
    assert engine.completion(matcher, gemma.vocab, tokenizer, 76, "56") == ("ly", True)
    assert not matcher.is_accepting()  # left where it was


def test_a_detour_finds_the_required_key_the_greedy_walk_passes_over(gemma):
    """After `[{"key": "a"}, ` in an array of objects whose one required key comes after optional
    ones, the greedy walk writes every optional key first; leaving it once at the first free choice
    finds `{"key": ""}]}`, so a budget that only that fits does not kill the particle."""
    from steer.constraints import engine

    item = {"type": "object", "additionalProperties": False, "required": ["key"],
            "properties": {name: {"type": "string"} for name in ("assets", "date", "id", "name", "key")}}
    schema = {"type": "object", "additionalProperties": False, "required": ["items"],
              "properties": {"items": {"type": "array", "items": item}}}
    constraint = engine.json_schema(schema)
    matcher = constraint.matcher(gemma.vocab)
    assert matcher.consume_tokens(gemma.encode('{"items": [{"key": "a"}, ', bos=False))
    tokenizer = engine.ll_tokenizer(gemma.vocab)
    greedy, found = engine.completion(matcher, gemma.vocab, tokenizer, 400, ", ")
    assert found and greedy.startswith('{"assets"')
    greedy_tokens = len(tokenizer.tokenize_str(greedy))
    shorter = engine.shorter_completion(matcher, gemma.vocab, tokenizer, 400, ", ", greedy_tokens)
    assert shorter == '{"key": ""}]}'
    assert matcher.consume_tokens(tokenizer.tokenize_str(shorter)) and matcher.is_accepting()
    matcher.rollback(len(tokenizer.tokenize_str(shorter)))
    # the budget uses it: with room for the short completion only, the particle is not ended
    need = constraint.need(matcher, gemma.vocab, tokenizer, 12, within=12)
    assert need == len(tokenizer.tokenize_str(shorter)) + 1 < greedy_tokens


def test_the_budget_check_before_the_last_token_is_exact_inside_a_string(gemma):
    """With two tokens left inside a JSON string (where a quarter-million tokens are allowed and the
    mask is not looked ahead of), a drawn token passes only if the text can end right after it: `",`
    opens another key that cannot be written in one token, `"}` ends the document.  (The greedy
    completion search gives up after `",` within so few characters, which once let it through.)"""
    from steer.constraints import engine
    from steer.constraints.checks import all_of

    schema = {"type": "object", "additionalProperties": False, "required": ["description"],
              "properties": {"description": {"type": "string"}, "a_rather_long_optional_note": {"type": "string"}}}
    constraint = engine.json_schema(schema)
    prefix = gemma.encode('{"description": "a long story', bos=False)
    ctx = steer.LMContext(gemma, "JSON:", heal=False, max_tokens=len(prefix) + 2)
    ctx.extend(prefix)
    assert ctx.tokens_left == 2
    fits = constraint._budget_check(ctx)
    opens, ends = (gemma.encode(s, bos=False) for s in ('",', '"}'))
    assert len(opens) == 1 and len(ends) == 1
    assert not fits(opens[0]) and fits(ends[0])
    assert not all_of([fits, constraint._continues_check(ctx)])(opens[0])


def test_the_completion_search_leaves_a_recursive_optional_key(gemma):
    """An optional recursive key that comes first (`{"children": [{"children": ...`) sends the greedy
    walk round for ever; the search sees it going round, takes another key at the last round, and
    comes back out of the nesting with a complete document."""
    from steer.constraints import engine

    schema = {"type": "object", "additionalProperties": False, "required": ["name"],
              "properties": {"children": {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
                             "name": {"type": "string"}}}
    matcher = engine.json_schema(schema).matcher(gemma.vocab)
    tokenizer, probes = engine.ll_tokenizer(gemma.vocab), engine.probe_tokens(gemma.vocab)
    walked, found = engine._greedy_walk(matcher, probes, tokenizer, 2000, "")
    assert not found and walked.startswith('{"children": [{"children": [{"children": [')
    text, found = engine.completion(matcher, gemma.vocab, tokenizer, 2000, "")
    assert found and text.endswith('"name": ""}'), text
    ids = tokenizer.tokenize_str(text)
    assert matcher.consume_tokens(ids) and matcher.is_accepting()
    matcher.rollback(len(ids))
    assert engine._circling('[{"a": [{"a": [{"a": [{"a": ') is not None
    assert engine._circling('"x": 0}], "x": 0}], "x": 0}], "x": 0}]') is None  # coming back out


def test_the_completion_search_writes_a_patterns_literal_ending(gemma):
    """Inside `^file:.+\\.tpkx?$` every character is allowed but `"`, and the greedy walk writes `}]`
    for ever (so the budget knew nothing and particles ran out of tokens); the pattern's literal
    pieces, tried where they fit, end the string."""
    from steer.constraints import engine

    schema = {"type": "object", "additionalProperties": False, "required": ["path"],
              "properties": {"path": {"type": "string", "pattern": "^file:.+\\.tpkx?$"}}}
    constraint = engine.json_schema(schema)
    assert constraint.hints == ("file:", ".tpk")
    matcher = constraint.matcher(gemma.vocab)
    tokenizer = engine.ll_tokenizer(gemma.vocab)
    assert matcher.consume_tokens(gemma.encode('{"path": "file:../p20/portland', bos=False))
    assert engine.completion(matcher, gemma.vocab, tokenizer, 200, "nd")[1] is False
    text, found = engine.completion(matcher, gemma.vocab, tokenizer, 200, "nd", constraint.hints)
    assert found and text.endswith('.tpk"}'), text
    ids = tokenizer.tokenize_str(text)
    assert matcher.consume_tokens(ids) and matcher.is_accepting()
    matcher.rollback(len(ids))
    assert constraint.need(matcher, gemma.vocab, tokenizer, 100, tail="nd") == len(ids) + 1


def test_the_check_before_the_last_token_needs_an_ending_token_after_a_complete_text(gemma):
    """With an end string, the last token may be one that writes it, but only after a complete text:
    with two tokens left in `\\w+ly` after digits, "ly" passes (a newline then ends the text) and
    another digit does not (no one token writes "ly" and the newline; every particle that took it
    used to die at the last step)."""
    from steer.constraints import engine

    constraint = engine.regex(r" \w+ly")
    prefix = gemma.encode(" 1962", bos=False)
    ctx = steer.LMContext(gemma, "An adverb:", heal=False, end="\n", max_tokens=len(prefix) + 2)
    ctx.extend(prefix)
    assert ctx.tokens_left == 2
    fits = constraint._budget_check(ctx)
    (ly,), (digit,) = (gemma.encode(s, bos=False) for s in ("ly", "6"))
    assert fits(ly) and not fits(digit)


def test_one_token_probes_settle_the_look_ahead_as_the_whole_mask_would(gemma, monkeypatch):
    """The look-ahead settles most candidates with a few one-character probes instead of the engine's
    whole mask after each: along a JSON document, with and without the probes, every step's mask is
    the same, dead ends (a lone space before a quoted key) included."""
    from steer.constraints import engine

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
              "items": {"enum": ["red", "green"]}}, "ok": {"type": "boolean"}}}
    ids = gemma.encode(json.dumps({"name": "Ada Lovelace", "tags": ["red", "green"], "ok": False}), bos=False)

    def masks(probes: int) -> list[np.ndarray]:
        monkeypatch.setattr(engine, "PROBES", probes)
        forget_probes()
        constraint = engine.json_schema(schema)
        ctx = steer.LMContext(gemma, [gemma.vocab.bos_id], heal=False)
        out = []
        for token in ids:
            out.append(constraint.allowed_in(ctx).numpy().copy())
            assert out[-1][token]
            cut.append(bool((constraint.state(ctx).allowed() & ~gemma.vocab.special & ~out[-1]).any()))
            ctx.extend([token])
        forget_probes()
        return out

    def forget_probes():  # the probe lists are cached per vocabulary
        gemma.vocab._derived.pop(engine._one_character_tokens, None)
        gemma.vocab._derived.pop(("recent", "probes after"), None)

    cut: list[bool] = []
    with_probes, without = masks(engine.PROBES), masks(0)
    assert all(np.array_equal(a, b) for a, b in zip(with_probes, without))
    assert any(cut)  # somewhere the look-ahead leaves out a token the engine allows
