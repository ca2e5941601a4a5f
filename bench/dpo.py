"""DPO on the default model: steer's trainer (LM head on completion positions only) next to a plain
TRL DPOTrainer with the same settings, with and without LoRA.

Each configuration runs in its own child process (peak memory is a per-process high-water mark),
on the same vendored HH-RLHF pairs, batch, length and seed; one invocation runs all of them.
Seconds per step exclude the first (warm-up) step; tokens/s counts the non-padding tokens TRL logs.

    python bench/dpo.py [--steps 4] [--batch-size 2] [--max-length 256] [--configs ours-lora,trl-lora,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "hh_rlhf_harmless.jsonl.gz"
CONFIGS = ("ours-lora", "trl-lora", "ours-full", "trl-full")


def one(config: str, steps: int, batch_size: int, max_length: int) -> dict:
    """Run one configuration in this process and measure it."""
    from transformers import TrainerCallback

    from train.common import TrainOptions, quiet_transformers
    from train.data import load_pairs
    from train.dpo import build_trainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    quiet_transformers()
    kind, mode = config.split("-")
    pairs = load_pairs(DATA, limit=steps * batch_size)
    with tempfile.TemporaryDirectory() as out:
        options = TrainOptions(out=out, max_steps=steps, batch_size=batch_size, max_length=max_length,
                               lora=mode == "lora", learning_rate=5e-6, save_steps=10_000, eval_fraction=0.0,
                               progress=False, seed=0)
        clock = Clock()
        trainer = build_trainer(pairs, [], options, fast_head=kind == "ours", callbacks=[clock])
        trainer.train()
    durations = [e - s for s, e in zip(clock.starts, clock.ends)][1:]
    tokens = [row["num_tokens"] for row in trainer.state.log_history if "num_tokens" in row]
    return {"config": config, "seconds_per_step": sum(durations) / len(durations),
            "tokens_per_second": (tokens[-1] - tokens[0]) / sum(durations),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "loss": trainer.state.log_history[-2].get("loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch_size, args.max_length)))
        return
    results = []
    for config in args.configs.split(","):
        child = subprocess.run([sys.executable, __file__, "--one", config, "--steps", str(args.steps),
                                "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)],
                               capture_output=True, text=True, check=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    by = {r["config"]: r for r in results}
    print(f"DPO on Gemma 3 270M: {args.batch_size} pairs x {args.max_length} tokens, {args.steps} steps "
          "(first excluded)\n")
    print(f"{'config':<10} {'s/step':>8} {'tokens/s':>9} {'peak RSS':>9} {'speed-up':>9}")
    for r in results:
        kind, mode = r["config"].split("-")
        base = by.get(f"trl-{mode}")
        ratio = f"{base['seconds_per_step'] / r['seconds_per_step']:.2f}x" if base else "-"
        print(f"{r['config']:<10} {r['seconds_per_step']:>8.2f} {r['tokens_per_second']:>9.1f} "
              f"{r['peak_rss_gb']:>7.2f}GB {ratio:>9}")
    print(json.dumps({"bench": "dpo", "steps": args.steps, "batch_size": args.batch_size,
                      "max_length": args.max_length, "results": results}))


if __name__ == "__main__":
    main()
