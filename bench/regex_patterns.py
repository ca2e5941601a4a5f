"""Regular expressions as users write them, on the default model: the text ends at a newline.

Each pattern comes with a prompt that invites it: 24 regular ones, then 36 that use Unicode properties,
back-references, look-around, atomic groups, conditionals, multi-line anchors and word boundaries
(`regex` where llguidance compiles the pattern, else `partial_regex`, as the docs advise).  SMC with N particles (default settings: token
healing, canonical tokenization, `end="\\n"`), one run per pattern and seed; a particle is correct when
its text (before the newline) fully matches the pattern.  Prints per pattern the weighted accuracy,
the share of particles that ended (newline or end-of-text) within the token budget, log_ml and
seconds, then a JSON line with the means.

    python bench/regex_patterns.py [--particles 8] [--seeds 0] [--max-tokens 100] [--only regular|other] [--compare]

`--compare` also runs without canonical tokenization, side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import regex as re

import steer
from steer import checks, patterns
from steer.context import LMContext

from regex_cases import CASES, REGULAR  # noqa: E402  (shared with the genlm-control runner)


def constraint(pattern: str):
    """As the docs say: `regex` where llguidance compiles it, else `partial_regex` (AWRS)."""
    try:
        return patterns.regex(pattern)
    except steer.SteerError:
        return checks.partial_regex(pattern)


class UntilNewline(steer.Program):
    def __init__(self, lm, prompt, pattern, max_tokens, **options):
        super().__init__()
        self.ctx = LMContext(lm, prompt, end="\n", max_tokens=max_tokens, **options)
        self.constraint = constraint(pattern)
        self.max_tokens = max_tokens

    async def step(self):
        await self.observe(self.ctx.allowed(self.constraint), True)
        token = await self.sample(self.ctx.next_token())
        if token.is_eos or len(self.ctx.generated) >= self.max_tokens:
            self.finish()


def run(lm, prompt, pattern, particles, seed, max_tokens, **options) -> dict:
    start = time.perf_counter()
    try:
        post = steer.smc(UntilNewline(lm, prompt, pattern, max_tokens, **options), particles=particles, seed=seed)
    except steer.ParticlesDiedError:
        return {"accuracy": 0.0, "ended": 0.0, "log_ml": -math.inf, "seconds": time.perf_counter() - start}
    accuracy = sum(w for p, w in zip(post.particles, post.weights) if re.fullmatch(pattern, p.ctx.text))
    ended = sum(1 for p in post.particles if p.ctx.ended or (p.ctx.generated and p.ctx.generated[-1] in lm.vocab.eos_ids))
    return {"accuracy": accuracy, "ended": ended / particles, "log_ml": post.log_ml,
            "seconds": time.perf_counter() - start, "example": post.particles[0].ctx.text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-tokens", type=int, default=100, help="the token budget (context max_tokens)")
    parser.add_argument("--only", choices=["regular", "other"], help="only the regular patterns, or only the others")
    parser.add_argument("--compare", action="store_true", help="also run with canonical=False")
    args = parser.parse_args()
    lm = steer.load_model()
    configs = {"default": {}}
    if args.compare:
        configs["no canonical"] = {"canonical": False}
    summary = {}
    for label, options in configs.items():
        rows = []
        print(f"\n{label}\n{'pattern':<44} {'accuracy':>8} {'ended':>6} {'log_ml':>8} {'s':>6}  example")
        cases = CASES if not args.only else [c for c in CASES if (args.only == "regular") == (c in CASES[:REGULAR])]
        for prompt, pattern in cases:
            for seed in args.seeds:
                r = run(lm, prompt, pattern, args.particles, seed, args.max_tokens, **options)
                rows.append(r)
                print(f"{pattern[:44]:<44} {r['accuracy']:>8.3f} {r['ended']:>6.2f} {r['log_ml']:>8.2f} "
                      f"{r['seconds']:>6.1f}  {r.get('example', '')!r}")
        finite = [r["log_ml"] for r in rows if math.isfinite(r["log_ml"])]
        summary[label] = {
            "weighted_accuracy": statistics.fmean(r["accuracy"] for r in rows),
            "ended_share": statistics.fmean(r["ended"] for r in rows),
            "mean_log_ml": statistics.fmean(finite) if finite else None,
            "all_died": sum(1 for r in rows if not math.isfinite(r["log_ml"])),
            "seconds": sum(r["seconds"] for r in rows),
            "median_seconds": statistics.median(r["seconds"] for r in rows),
        }
    print()
    for label, s in summary.items():
        print(label, s)
    print(json.dumps({**summary["default"], "patterns": len(cases), "particles": args.particles,
                      "seeds": args.seeds, "configs": summary}))


if __name__ == "__main__":
    main()
