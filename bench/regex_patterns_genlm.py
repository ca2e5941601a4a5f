"""The patterns of bench/regex_patterns.py on genlm-control, for a side-by-side comparison.

Runs in an environment of its own (genlm-control pins its own stack):

    python3 -m venv .venv-genlm && .venv-genlm/bin/pip install torch==2.13.0 genlm-control==0.4.1
    .venv-genlm/bin/python bench/regex_patterns_genlm.py --model ~/.cache/steer/models/<default model>

The same default model (the converted Gemma 3 270M directory steer caches), the same prompts, N
particles, ESS threshold 0.5, the text ending at a newline, at most `--max-tokens` tokens.  The
constraint is the `regex` module's partial match on the bytes written (any pattern), sampled with
genlm-control's AWRS, as its documentation shows for custom potentials.  A particle is correct when
its text fully matches the pattern.  Prints a row per pattern and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from pathlib import Path

import regex as re
from genlm.control import AWRS, Potential, PromptedLLM

from regex_cases import CASES, REGULAR


class PartialMatch(Potential):
    """0 while the bytes so far can still become a full match (complete: are one), -inf otherwise."""

    def __init__(self, pattern: str):
        self.compiled = re.compile(pattern)
        super().__init__(vocabulary=list(range(256)))

    @staticmethod
    def _text(context) -> str:
        return bytes(context).decode("utf-8", errors="ignore")  # an unfinished character waits

    async def prefix(self, context):
        ok = self.compiled.fullmatch(self._text(context), partial=True, timeout=1.0) is not None
        return 0.0 if ok else -math.inf

    async def complete(self, context):
        ok = self.compiled.fullmatch(self._text(context), timeout=1.0) is not None
        return 0.0 if ok else -math.inf


async def run(llm, prompt: str, pattern: str, particles: int, max_tokens: int) -> dict:
    llm.prompt_ids = llm.model.tokenizer.encode(prompt)
    sampler = AWRS(llm, PartialMatch(pattern).coerce(llm, f=b"".join))
    start = time.perf_counter()
    sequences = await sampler.smc(n_particles=particles, ess_threshold=0.5, max_tokens=max_tokens)
    seconds = time.perf_counter() - start
    posterior = sequences.decoded_posterior
    accuracy = sum(p for text, p in posterior.items() if re.fullmatch(pattern, text.rstrip("\n")))
    return {"accuracy": accuracy, "seconds": seconds, "example": next(iter(posterior), "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a local Hugging Face model directory")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--only", choices=["regular", "other"])
    parser.add_argument("--limit", type=int, help="the first N patterns only")
    args = parser.parse_args()
    llm = PromptedLLM.from_name(str(args.model), backend="hf", eos_byte_strings=[b"\n"])
    cases = CASES if not args.only else [c for c in CASES if (args.only == "regular") == (c in CASES[:REGULAR])]
    rows = []
    for prompt, pattern in cases[: args.limit]:
        try:
            row = asyncio.run(run(llm, prompt, pattern, args.particles, args.max_tokens))
        except Exception as e:  # noqa: BLE001 - a failed run counts as a miss, with its reason
            row = {"accuracy": 0.0, "seconds": float("nan"), "example": f"{type(e).__name__}: {e}"[:60]}
        rows.append(row)
        print(f"{pattern[:44]:<44} {row['accuracy']:>8.3f} {row['seconds']:>6.1f}  {row['example']!r}", flush=True)
    seconds = [r["seconds"] for r in rows if not math.isnan(r["seconds"])]
    print(json.dumps({"engine": "genlm-control 0.4.1", "patterns": len(rows), "particles": args.particles,
                      "weighted_accuracy": statistics.fmean(r["accuracy"] for r in rows),
                      "median_seconds": statistics.median(seconds) if seconds else None}))


if __name__ == "__main__":
    main()
