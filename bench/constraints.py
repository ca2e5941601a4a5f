"""The cost of constraints: time per SMC step on the default model, unconstrained and with each kind.

Runs, in one process and interleaved (round-robin, best of --repeats), SMC with N particles for T
tokens without a constraint and with each constraint kind (masks, a regex and a JSON-schema
on llguidance (regex, the `callme` phone number, a JSON schema, a Lark grammar), steer's own regex
automaton, and a partial regex through AWRS), and prints the time per step and its
ratio to the unconstrained step.  Also times the per-token table of the vocabulary, computed cold and
loaded from the disk cache, a regex automaton's first mask, and llguidance's tokenizer.  Constraints are built once per run
configuration and warmed up first, as a program would reuse them.

    python bench/constraints.py [--particles 16] [--tokens 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

import steer
from steer import checks, masks, patterns
from steer.constraints import engine
from steer.constraints.tokens import TokenTable
from steer.context import LMContext

WORDS = r"[A-Za-z ,.']+"  # unbounded: a bounded repeat {1,400} has 400 states, each walked once
PHONE = r" \(\d{3}\) \d{3}-\d{4}"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "city", "tags"], "additionalProperties": False}
CONSTRAINTS = {
    "word_length(max=7)": lambda: masks.word_length(max=7),
    "exclude_chars('eE')": lambda: masks.exclude_chars("eE"),
    "banned_words(6 words)": lambda: masks.banned_words(["the", "a", "an", "and", "of", "to"]),
    "regex (llguidance)": lambda: patterns.regex(WORDS),
    "callme regex (llguidance)": lambda: patterns.regex(PHONE),
    "json_schema (llguidance)": lambda: patterns.json_schema(PERSON),
    "grammar (llguidance)": lambda: checks.grammar("start: WORD+\nWORD: /[A-Za-z,.']+/\n%ignore \" \"\n"),
    "regex (automaton)": lambda: patterns.automaton(WORDS),
    "partial_regex (AWRS)": lambda: checks.partial_regex(WORDS),
}
PROMPTS = {"json_schema (llguidance)": "A person, as JSON: ", "callme regex (llguidance)": "Call me at"}


class Constrained(steer.Program):
    def __init__(self, lm, prompt, n, constraint):
        super().__init__()
        self.ctx = LMContext(lm, prompt)
        self.n, self.constraint = n, constraint

    async def step(self):
        if self.constraint is not None:
            await self.observe(self.ctx.allowed(self.constraint), True)
        token = await self.sample(self.ctx.next_token())
        if token.is_eos or len(self.ctx.generated) >= self.n:
            self.finish()


def per_step(lm, prompt, n, t, constraint) -> float:
    post = steer.smc(Constrained(lm, prompt, t, constraint), particles=n, seed=0)
    return post.seconds / max(len(post.trace), 1)  # a run that ends early (the phone number) has fewer steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lm = steer.load_model()
    prompt = "Once upon a time, in a small village by the sea,"

    start = time.perf_counter()
    TokenTable(lm.vocab, cache=False)
    table_cold = time.perf_counter() - start
    start = time.perf_counter()
    TokenTable(lm.vocab)
    table_cached = time.perf_counter() - start
    start = time.perf_counter()
    first = patterns.automaton(WORDS)
    first.mask(LMContext(lm, prompt))
    regex_first = time.perf_counter() - start
    start = time.perf_counter()
    engine.ll_tokenizer(lm.vocab)
    llguidance_tokenizer = time.perf_counter() - start

    built = {name: make() for name, make in CONSTRAINTS.items()}
    configs = {"unconstrained": None, **built}
    for name, constraint in configs.items():  # warm-up: model, caches of each constraint's first states
        per_step(lm, PROMPTS.get(name, prompt), args.particles, 3, constraint)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, constraint in configs.items():
            seconds = per_step(lm, PROMPTS.get(name, prompt), args.particles, args.tokens, constraint)
            best[name] = min(best.get(name, float("inf")), seconds)
    base = best["unconstrained"]

    print(f"\nN={args.particles} particles, {args.tokens} tokens, model {lm.name}, best of {args.repeats}")
    print(f"{'':26s} {'s/step':>8s} {'vs unconstrained':>17s}")
    for name, seconds in best.items():
        print(f"{name:26s} {seconds:8.3f} {seconds / base:16.2f}x")
    print(f"token table: {table_cold:.2f}s cold, {table_cached:.3f}s from the disk cache; "
          f"first regex mask (automaton + vocabulary walk): {regex_first:.2f}s; "
          f"llguidance tokenizer (once per process): {llguidance_tokenizer:.2f}s")
    print(json.dumps({
        "benchmark": "constraints", "particles": args.particles, "tokens": args.tokens,
        "seconds_per_step": {k: round(v, 4) for k, v in best.items()},
        "ratio": {k: round(v / base, 3) for k, v in best.items()},
        "token_table_cold_s": round(table_cold, 3), "token_table_cached_s": round(table_cached, 4),
        "first_regex_mask_s": round(regex_first, 3), "llguidance_tokenizer_s": round(llguidance_tokenizer, 2),
    }))


if __name__ == "__main__":
    main()
