"""Soft steering with few particles: prefer positive words after "The movie was" (default model).

Runs SMC (N=8, 20 tokens, seeds 0-4) three ways: no steering; a score paid once a listed word is
complete (what a score-only program can do); and the word tilt `prefer_words(words, bonus)`, which
proposes the listed words' tokens.  Reports the weighted share of final particles that contain a listed
word, the mean log_ml, and fluency: the mean per-token log-probability of the final texts under the
untilted model.

    python bench/soft.py [--particles 8] [--seeds 0 1 2 3 4] [--bonus 2.0]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

import torch

import steer
from steer.context import LMContext

WORDS = ["good", "great", "wonderful", "amazing", "excellent", "fun", "beautiful", "brilliant", "enjoyable", "best"]
PROMPT = "The movie was"
TOKENS = 20


def hits(text: str) -> int:
    return sum(w.lower() in WORDS for w in re.findall(r"[^\W\d_]+", text))


class Review(steer.Program):
    def __init__(self, lm, mode, bonus):
        super().__init__()
        self.ctx = LMContext(lm, PROMPT)
        self.mode, self.bonus = mode, bonus
        self.tilt = steer.tilts.prefer_words(WORDS, bonus) if mode == "tilt" else None
        self.paid = 0

    async def step(self):
        token = await self.sample(self.ctx.next_token(tilt=self.tilt))
        done = token.is_eos or self.ctx.written >= TOKENS
        if self.mode == "score":  # pay for complete listed words only, as they appear
            complete = hits(self.ctx.text if done else re.sub(r"[^\W\d_]+\Z", "", self.ctx.text))
            self.score(self.bonus * (complete - self.paid))
            self.paid = complete
        if done:
            if self.tilt is not None and not token.is_eos:
                self.score(self.tilt.settle(self.ctx))
            self.finish()


def fluency(lm, ctx) -> float:
    """Mean log-probability per generated token under the model itself (no tilt)."""
    ids = [t for t in ctx.tokens if t not in lm.vocab.eos_ids]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    n = ctx.prompt_length
    gen = ids[n:]
    return statistics.fmean(logp[n - 1 + i, t].item() for i, t in enumerate(gen)) if gen else 0.0


def run(lm, mode, particles, seeds, bonus) -> dict:
    hit, log_ml, fluent, seconds = [], [], [], 0.0
    for seed in seeds:
        post = steer.smc(Review(lm, mode, bonus), particles=particles, seed=seed)
        seconds += post.seconds
        hit.append(sum(w for p, w in zip(post.particles, post.weights) if hits(p.ctx.text) > 0))
        log_ml.append(post.log_ml)
        fluent.append(sum(w * fluency(lm, p.ctx) for p, w in zip(post.particles, post.weights)))
    return {"hit_rate": statistics.fmean(hit), "hit_rates": hit, "log_ml": statistics.fmean(log_ml),
            "fluency": statistics.fmean(fluent), "seconds": seconds,
            "example": post.particles[int(torch.tensor(post.weights).argmax())].ctx.text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--bonus", type=float, default=2.0)
    args = parser.parse_args()
    lm = steer.load_model()
    rows = {mode: run(lm, mode, args.particles, args.seeds, args.bonus) for mode in ("base", "score", "tilt")}
    print(f"{'steering':<10} {'hit rate':>9} {'per seed':>30} {'log_ml':>8} {'fluency':>8} {'s':>6}  example")
    for mode, r in rows.items():
        per_seed = " ".join(f"{h:.2f}" for h in r["hit_rates"])
        print(f"{mode:<10} {r['hit_rate']:>9.3f} {per_seed:>30} {r['log_ml']:>8.2f} {r['fluency']:>8.3f} "
              f"{r['seconds']:>6.1f}  {r['example']!r}")
    print(json.dumps({"hit_rate_base": rows["base"]["hit_rate"], "hit_rate_score": rows["score"]["hit_rate"],
                      "hit_rate_tilt": rows["tilt"]["hit_rate"],
                      "hit_rates_tilt_per_seed": rows["tilt"]["hit_rates"], "log_ml_base": rows["base"]["log_ml"],
                      "log_ml_score": rows["score"]["log_ml"], "log_ml_tilt": rows["tilt"]["log_ml"],
                      "fluency_base": rows["base"]["fluency"], "fluency_tilt": rows["tilt"]["fluency"],
                      "bonus": args.bonus, "particles": args.particles, "seeds": args.seeds}))


if __name__ == "__main__":
    main()
