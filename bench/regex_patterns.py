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

CASES = [  # (prompt, pattern)
    ("Date of the meeting (YYYY-MM-DD):", r" ?\d{4}-\d{2}-\d{2}"),
    ("The time now, in 24-hour format:", r" ?([01]\d|2[0-3]):[0-5]\d"),
    ("Her email address:", r" ?[a-z0-9._]{1,20}@[a-z0-9]{1,12}\.(com|org|net)"),
    ("Call the office at", r" \(\d{3}\) \d{3}-\d{4}"),
    ("ZIP code:", r" ?\d{5}"),
    ("The background color in hex is", r" #[0-9a-fA-F]{6}"),
    ("The server's IPv4 address is", r" (\d{1,3}\.){3}\d{1,3}"),
    ("The release version is", r" v?\d+\.\d+\.\d+"),
    ("The total price was", r" \$\d{1,4}\.\d{2}"),
    ("The success rate was", r" \d{1,2}(\.\d)?%"),
    ("Answer yes or no. Is the sky blue? Answer:", r" (yes|no)"),
    ("The capital of France is", r" [A-Z][a-z]+\."),
    ("The state abbreviation for California is", r" [A-Z]{2}"),
    ("A US Social Security number looks like", r" \d{3}-\d{2}-\d{4}"),
    ("The flight number was", r" [A-Z]{2}\d{2,4}"),
    ("The temperature today in Celsius:", r" -?\d{1,2}(\.\d)? ?°C"),
    ("List three fruits, separated by commas:", r" [a-z]+, [a-z]+, [a-z]+"),
    ("The year the war ended:", r" (1[89]|20)\d\d"),
    ("A hashtag for the event:", r" #[A-Za-z][A-Za-z0-9]{2,15}"),
    ("The file was saved as", r" [a-z_]{1,16}\.(txt|csv|json|py)"),
    ("Coordinates of the city:", r" -?\d{1,2}\.\d{2,4}, -?\d{1,3}\.\d{2,4}"),
    ("The ISBN of the book is", r" 978-\d-\d{3}-\d{5}-\d"),
    ("The product code is", r" [A-Z]{3}-\d{4}"),
    ("The URL of the site is", r" https?://[a-z0-9]{2,16}\.(com|org)(/[a-z]{1,10})?"),
    # Unicode properties
    ("The French word for summer is", r" \p{Ll}+"),
    ("Her first name, capitalised:", r" \p{Lu}\p{Ll}{2,12}"),
    ("The Greek letter for pi is", r" \p{Greek}"),
    ("A German word with an umlaut:", r" \p{L}*[äöü]\p{L}*"),
    ("The currency symbol of the euro is", r" \p{Sc}"),
    ("The number twenty, in Spanish:", r" \p{L}+( \p{L}+)?"),
    # back-references
    ("A word said twice, like 'bye bye':", r" (\w+) \1"),
    ("A word in an HTML bold tag:", r" <(b|i)>\w+</\1>"),
    ("A three-letter palindrome:", r" (\w)\w\1"),
    ("A word in single or double quotes:", r" (['\"])\w+\1"),
    ("A date with the same separator twice:", r" \d{2}([-/.])\d{2}\1\d{4}"),
    ("A word with a doubled letter, like 'letter':", r" \w*(\w)\1\w*"),
    # look-around
    ("A password with at least one digit:", r" (?=\w*\d)\w{6,12}"),
    ("The price in dollars:", r" (?<=\s)\$\d+(\.\d\d)?"),
    ("A word that does not start with 'the':", r" (?!the)[a-z]+"),
    ("A number, not a percentage:", r" \d+(?!%)"),
    ("A word that does not end in 'ing':", r" [a-z]+(?<!ing)"),
    ("A capitalised word not starting with Q:", r" (?!Q)[A-Z][a-z]+"),
    # atomic groups and possessive quantifiers
    ("The order number is", r" (?>\d+)-[A-Z]"),
    ("The code is", r" (?>[A-Z]+)\d{2}"),
    ("The user ID is", r" \d++[a-z]"),
    ("A hashtag:", r" #(?>\w+)"),
    ("The amount:", r" (?>\d{1,3})(,\d{3})*"),
    # conditionals
    ("A phone number, with or without parentheses:", r" (\()?\d{3}(?(1)\)) \d{3}-\d{4}"),
    ("A word, maybe in quotes:", r' (")?\w+(?(1)")'),
    ("The code (a letter before means a letter after):", r" ([A-Z])?\d{3}(?(1)[A-Z])"),
    ("A word, possibly in brackets:", r" (\[)?[a-z]+(?(1)\])"),
    ("The loss, in parentheses if negative:", r" (\()?\d+(?(1)\))"),
    # multi-line anchors
    ("A line with one word:", r"(?m) \w+$"),
    ("Two items on one line:", r"(?m) \w+, \w+$"),
    ("A single word on its line:", r"(?m)^ \w+$"),
    ("Answer yes or no:", r"(?m)^ (yes|no)$"),
    # word boundaries
    ("Two words:", r" \w+\b \b\w+"),
    ("An adverb ending in 'ly':", r" \w+ly\b"),
    ("Three words and a full stop:", r" \b\w+\b \b\w+\b \b\w+\b\."),
    ("A word starting with 'un':", r" \bun\w+"),
]


def constraint(pattern: str):
    """As the docs say: `regex` where llguidance compiles it, else `partial_regex` (AWRS)."""
    try:
        return patterns.regex(pattern)
    except steer.SteerError:
        return checks.partial_regex(pattern)


class UntilNewline(steer.Program):
    def __init__(self, lm, prompt, pattern, max_tokens, **options):
        super().__init__()
        self.ctx = lm.context(prompt, end="\n", max_tokens=max_tokens, **options)
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
        cases = CASES if not args.only else [c for c in CASES if (args.only == "regular") == (c in CASES[:24])]
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
