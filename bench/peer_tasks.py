"""The peers' two standard tasks, end to end, on each backend: wall time and tokens per second.

`hard`: every word at most five letters, 10 particles x 20 tokens after "My favorite writing style is";
`unconstrained`: 8 particles x 128 tokens.  Model loading is not counted; each task runs once to warm
up, then `--repeats` times (best kept).

    python bench/peer_tasks.py [--configs hf:float32 hf:bfloat16 vllm:bfloat16] [--repeats 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import steer  # noqa: E402


TASKS = {
    "hard": dict(prompt="My favorite writing style is", particles=10, tokens=20, mask=lambda: steer.masks.word_length(max=5)),
    "unconstrained": dict(prompt="The history of the city begins", particles=8, tokens=128, mask=lambda: None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["hf:float32", "hf:bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        backend, dtype = config.split(":")
        lm = steer.load_model(backend=backend, dtype=dtype)
        for name, task in TASKS.items():
            def run(seed):
                return steer.smc(steer.Generate(lm, task["prompt"], task["tokens"], mask=task["mask"]()),
                                 particles=task["particles"], seed=seed)
            run(0)
            best, posterior = float("inf"), None
            for seed in range(1, args.repeats + 1):
                start = time.perf_counter()
                posterior = run(seed)
                best = min(best, time.perf_counter() - start)
            tokens = sum(len(p.context.generated) for p in posterior.particles)
            ok = all(len(w) <= 5 for t in posterior.distribution() for w in re.findall(r"[^\W\d_]+", t)) \
                if name == "hard" else True
            rows.append({"config": config, "task": name, "seconds": round(best, 2),
                         "tok_s": round(tokens / best, 1), "log_ml": round(posterior.log_ml, 2), "satisfied": ok})
        if backend == "vllm":
            lm.close()
    print(f"\n{'config':16s} {'task':14s} {'seconds':>8s} {'tok/s':>8s} {'log_ml':>8s} satisfied")
    for r in rows:
        print(f"{r['config']:16s} {r['task']:14s} {r['seconds']:8.2f} {r['tok_s']:8.1f} {r['log_ml']:8.2f} {r['satisfied']}")
    print(json.dumps({"bench": "peer_tasks", "results": rows}))


if __name__ == "__main__":
    main()
