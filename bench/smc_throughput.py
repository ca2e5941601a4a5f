"""SMC throughput against transformers' own batched sampling, on the default model.

Runs, in one process and interleaved, HF `model.generate` (batch N, pure sampling) and steer's SMC with
N particles on the same prompt and length, and prints particle-tokens/s of each, their ratio, the peak
resident-memory growth of each, and how the cost of late SMC steps compares with early ones.

    python bench/smc_throughput.py [--particles 16] [--tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

import steer


class Unconstrained(steer.Program):
    """Sample exactly `n` tokens (EOS included as a token, like generate with min_new_tokens)."""

    def __init__(self, lm, prompt, n, penalty=0.0):
        super().__init__()
        self.ctx = lm.context(prompt, heal=False)  # the same prompt tokens as model.generate
        self.n, self.penalty = n, penalty

    async def step(self):
        token = await self.sample(self.ctx.next_token())
        if self.penalty:  # a soft potential, so that weights differ and resampling reorders the cache
            self.score(-self.penalty * token.text.count("e"))
        if len(self.ctx.generated) >= self.n:
            self.finish()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(fn):
    """(seconds, peak RSS growth in bytes, result) of fn()."""
    base, peak, stop = rss_bytes(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        watcher.join()
    return seconds, max(peak[0], rss_bytes()) - base, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = steer.load_model(args.model)
    n, t = args.particles, args.tokens
    enc = lm.tokenizer([args.prompt] * n, return_tensors="pt")

    def hf_generate():
        with torch.inference_mode():
            return lm.model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                     max_new_tokens=t, min_new_tokens=t)

    def smc_plain():
        return steer.smc(Unconstrained(lm, args.prompt, t), particles=n, seed=1)

    def smc_resampling():
        return steer.smc(Unconstrained(lm, args.prompt, t, penalty=0.5), particles=n, seed=1,
                         ess_threshold=1.0)

    runs = {"hf generate": hf_generate, "steer smc": smc_plain, "steer smc, resample every step": smc_resampling}
    # (after resampling, copies that draw the same token share one cache row and are computed once)
    times = {k: [] for k in runs}
    memory = {k: 0 for k in runs}
    flat = []
    resamples = 0
    hf_generate()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, grown, result = measure(fn)
            times[name].append(seconds)
            memory[name] = max(memory[name], grown)
            if isinstance(result, steer.Posterior):
                steps = [r.seconds for r in result.trace]
                early, late = statistics.median(steps[1:9]), statistics.median(steps[-8:])
                flat.append(late / early)
                resamples = max(resamples, sum(r.resampled for r in result.trace))

    rate = {k: n * t / min(v) for k, v in times.items()}
    base = rate["hf generate"]
    print(f"\nN={n} particles, {t} new tokens, model {lm.name}, best of {args.repeats}")
    print(f"{'':34s} {'particle-tok/s':>14s} {'vs generate':>12s} {'peak RSS +MiB':>14s}")
    for name in runs:
        print(f"{name:34s} {rate[name]:14.1f} {rate[name] / base:11.2f}x {memory[name] / 2**20:14.0f}")
    print(f"SMC step cost, last 8 steps / steps 2-9 (median over runs): {statistics.median(flat):.2f}")
    print(f"resampling events in the resample-every-step run: {resamples}")
    print(json.dumps({
        "bench": "smc_throughput", "particles": n, "tokens": t,
        "generate_tok_s": round(base, 2), "smc_tok_s": round(rate["steer smc"], 2),
        "smc_resampling_tok_s": round(rate["steer smc, resample every step"], 2),
        "ratio": round(rate["steer smc"] / base, 3),
        "ratio_resampling": round(rate["steer smc, resample every step"] / base, 3),
        "step_cost_late_over_early": round(statistics.median(flat), 3),
        "peak_rss_mib": {k: round(v / 2**20) for k, v in memory.items()},
    }))


if __name__ == "__main__":
    main()
