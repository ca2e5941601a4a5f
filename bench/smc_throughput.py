"""SMC throughput against the engines' own batched sampling, on the default model.

Runs, in one process and interleaved: transformers' `model.generate` (batch N, pure sampling) in float32
and bfloat16, vLLM's own `generate` (with `--backend vllm`), and steer's SMC with N particles on the
chosen backend and dtype: resampling at every step, and at ESS < N/2.  Prints particle-tokens/s of each,
ratios, the peak resident-memory growth, and how the cost of late SMC steps compares with early ones.

    python bench/smc_throughput.py [--backend hf|vllm] [--dtype float32|bfloat16] [--particles 16] [--tokens 64]

Every run uses all cores (vLLM on a CPU would otherwise drop the whole process to one thread).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import steer  # noqa: E402
from steer.context import LMContext


class Unconstrained(steer.Program):
    """Sample exactly `n` tokens (EOS included as a token, like generate with min_new_tokens)."""

    def __init__(self, lm, prompt, n, penalty=0.0):
        super().__init__()
        self.ctx = LMContext(lm, prompt, heal=False)  # the same prompt tokens as model.generate
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
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="steer's dtype (default: float32 on hf, bfloat16 on vllm)")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None, help="transformers' device (default: cuda when visible)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, t = args.particles, args.tokens
    hf = {d: steer.load_model(args.model, dtype=d, device=args.device) for d in ("float32", "bfloat16")}
    dtype = args.dtype or ("bfloat16" if args.backend == "vllm" else "float32")
    lm = hf[dtype] if args.backend == "hf" else steer.load_model(args.model, backend="vllm", dtype=dtype)
    enc = hf["float32"].tokenizer([args.prompt] * n, return_tensors="pt")

    def hf_generate(model):
        def go():
            with torch.inference_mode():
                return model.model.generate(**enc.to(model.device), do_sample=True, top_k=0, top_p=1.0,
                                            temperature=1.0, max_new_tokens=t, min_new_tokens=t).cpu()
        return go

    def smc(ess):
        return lambda: steer.smc(Unconstrained(lm, args.prompt, t, penalty=0.5), particles=n, seed=1,
                                 ess_threshold=ess)

    steer_name = f"steer smc {args.backend} {dtype}"
    runs = {"hf generate float32": hf_generate(hf["float32"]), "hf generate bfloat16": hf_generate(hf["bfloat16"])}
    if args.backend == "vllm":
        prompt_ids = enc["input_ids"][0].tolist()
        runs["vllm generate"] = lambda: lm.generate([prompt_ids] * n, t, seed=1)
    runs[f"{steer_name}, resample every step"] = smc(1.0)
    runs[f"{steer_name}, resample at ESS < N/2"] = smc(0.5)
    # (the soft potential makes weights differ, so resampling really reorders the particles)
    times = {k: [] for k in runs}
    memory = {k: 0 for k in runs}
    flat = []
    resamples = {k: 0 for k in runs}
    for fn in runs.values():  # warm-up: first calls compile and allocate
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, grown, result = measure(fn)
            times[name].append(seconds)
            memory[name] = max(memory[name], grown)
            if isinstance(result, steer.Posterior):
                steps = [r.seconds for r in result.trace]
                early, late = statistics.median(steps[1:9]), statistics.median(steps[-8:])
                flat.append(late / early)
                resamples[name] = max(resamples[name], sum(r.resampled for r in result.trace))

    rate = {k: n * t / min(v) for k, v in times.items()}
    base = rate["hf generate float32"]
    engine = rate.get("vllm generate", rate[f"hf generate {dtype}"])
    device = getattr(hf["float32"], "device", "cpu")
    where = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else \
        f"{torch.get_num_threads()} CPU threads"
    print(f"\nN={n} particles, {t} new tokens, model {lm.name}, best of {args.repeats}, {where}")
    print(f"{'':48s} {'particle-tok/s':>14s} {'vs hf fp32':>11s} {'vs engine':>10s} {'peak RSS +MiB':>14s}")
    for name in runs:
        print(f"{name:48s} {rate[name]:14.1f} {rate[name] / base:10.2f}x {rate[name] / engine:9.2f}x "
              f"{memory[name] / 2**20:14.0f}")
    print(f"SMC step cost, last 8 steps / steps 2-9 (median over runs): {statistics.median(flat):.2f}")
    print("resampling events: " + ", ".join(f"{k.split(', ')[-1]}: {v}" for k, v in resamples.items() if v))
    every, half = f"{steer_name}, resample every step", f"{steer_name}, resample at ESS < N/2"
    print(json.dumps({
        "bench": "smc_throughput", "backend": args.backend, "dtype": dtype, "particles": n, "tokens": t,
        "threads": torch.get_num_threads(), "device": where,
        "tok_s": {k: round(v, 2) for k, v in rate.items()},
        "smc_over_hf_fp32_generate": round(rate[every] / base, 3),
        "smc_ess_half_over_hf_fp32_generate": round(rate[half] / base, 3),
        "smc_over_engine_generate": round(rate[every] / engine, 3),
        "smc_ess_half_over_engine_generate": round(rate[half] / engine, 3),
        "step_cost_late_over_early": round(statistics.median(flat), 3),
        "peak_rss_mib": {k: round(v / 2**20) for k, v in memory.items()},
    }))


if __name__ == "__main__":
    main()
