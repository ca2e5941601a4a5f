"""Proposal quality on the default model: what particles are spent on, with default settings.

For each case, SMC with N particles over seeds 0, 1, 2 (default settings: token healing, canonical
tokenization, no control tokens), reporting the log marginal likelihood, the share of final particles
that satisfy the constraint, that are canonically tokenized (their tokens equal the tokenizer's
encoding of their own text), the ESS, and runs in which every particle died.

    python bench/proposals.py [--particles 10] [--seeds 0 1 2] [--compare]

`--compare` runs each case again with canonical tokenization and healing switched off, side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import regex as re

import steer
from steer import masks, patterns
from steer.context import LMContext

PHONE = r" \(\d{3}\) \d{3}-\d{4}"


class Constrained(steer.Program):
    """Observe `ctx.allowed(constraint)`, then sample `ctx.next_token()`, for at most `n` tokens; a
    pattern's text is complete once nothing can extend the match (the phone number is written)."""

    def __init__(self, lm, prompt, n, constraint=None, **options):
        super().__init__()
        self.ctx = LMContext(lm, prompt, **options)
        self.n, self.constraint = n, constraint

    async def step(self):
        if self.constraint is not None:
            await self.observe(self.ctx.allowed(self.constraint), True)
        token = await self.sample(self.ctx.next_token())
        done = getattr(self.constraint, "done", None)  # a pattern that nothing can extend any more
        if token.is_eos or len(self.ctx.generated) >= self.n or (done is not None and done(self.ctx)):
            self.finish()


CASES = {  # name: (prompt, constraint, max tokens, check of the final text)
    "callme": ("Call me at", lambda: patterns.regex(PHONE), 24, lambda t: re.fullmatch(PHONE, t)),
    "callme_space": ("Call me at ", lambda: patterns.regex(PHONE[1:]), 24, lambda t: re.fullmatch(PHONE[1:], t)),
    "plain": ("The movie was", lambda: None, 20, None),
    "lipogram": ("Once upon a time", lambda: masks.exclude_chars("eE"), 20, lambda t: not set(t) & set("eE")),
    "special": ("Write a sentence about the sea:", lambda: None, 64, None),
}


def canonical(lm, ctx) -> bool:
    """The context's tokens (after BOS) are what the tokenizer makes of their text."""
    ids = ctx.tokens[1:] if ctx.tokens and ctx.tokens[0] == lm.vocab.bos_id else ctx.tokens
    ids = [i for i in ids if i not in lm.vocab.eos_ids]
    return lm.encode(lm.decode(ids), bos=False) == ids


def run_case(lm, name, particles, seeds, **options) -> dict:
    prompt, make, n, check = CASES[name]
    rows = {"log_ml": [], "satisfied": [], "canonical": [], "ess_ratio": [], "died": 0, "special": 0,
            "negligible": [], "seconds": 0.0}
    for seed in seeds:
        start = time.perf_counter()
        try:
            post = steer.smc(Constrained(lm, prompt, n, make(), **options), particles=particles, seed=seed)
        except steer.ParticlesDiedError:
            rows["died"] += 1
            rows["log_ml"].append(-math.inf)
            continue
        rows["seconds"] += time.perf_counter() - start
        rows["log_ml"].append(post.log_ml)
        rows["ess_ratio"].append(post.ess / particles)
        w = post.weights
        rows["negligible"].append(sum(1 for x in w if x < 1e-3 / particles) / particles)
        for p in post.particles:
            ctx = p.ctx
            if check is not None:
                rows["satisfied"].append(bool(check(ctx.text)))
            rows["canonical"].append(canonical(lm, ctx))
            rows["special"] += sum(1 for i in ctx.generated if lm.vocab.special[i] and i not in lm.vocab.eos_ids)
    return rows


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def summary(results: dict) -> dict:
    canon = [c for r in results.values() for c in r["canonical"]]
    sat = results["callme"]["satisfied"] + results["callme_space"]["satisfied"]
    return {
        "callme_log_ml": mean(results["callme"]["log_ml"]),
        "callme_space_log_ml": mean(results["callme_space"]["log_ml"]),
        "callme_satisfied": mean(sat) if sat else 0.0,
        "canonical_share": mean(canon),
        "plain_ess_ratio": mean(results["plain"]["ess_ratio"]),
        "lipogram_died": results["lipogram"]["died"],
        "special_tokens_sampled": results["special"]["special"],
        "negligible_share": mean([x for r in results.values() for x in r["negligible"]]),
        "seconds": sum(r["seconds"] for r in results.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compare", action="store_true",
                        help="also run with canonical=False, heal=False and allow_special=True")
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    args = parser.parse_args()
    lm = steer.load_model()
    configs = {"default": {}}
    if args.compare:
        configs["no canonical"] = {"canonical": False, "allow_special": True}
        configs["no canonical, no healing"] = {"canonical": False, "heal": False, "allow_special": True}
    out = {}
    for label, options in configs.items():
        results = {name: run_case(lm, name, args.particles, args.seeds, **options) for name in args.cases}
        for name in CASES:
            results.setdefault(name, {"log_ml": [], "satisfied": [], "canonical": [], "ess_ratio": [],
                                      "died": 0, "special": 0, "negligible": [], "seconds": 0.0})
        out[label] = summary(results)
    keys = list(out["default"])
    print(f"{'metric':<24}" + "".join(f"{label:>28}" for label in out))
    for k in keys:
        print(f"{k:<24}" + "".join(f"{out[label][k]:>28.4g}" for label in out))
    print(json.dumps({**out["default"], "particles": args.particles, "seeds": args.seeds,
                      "configs": out}))


if __name__ == "__main__":
    main()
