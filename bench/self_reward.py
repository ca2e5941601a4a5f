"""Self-rewarding training on the default model, end to end, with small numbers (LoRA).

M1 = SFT(Gemma 3 270M, IFT + EFT from examples/data), then M2 and M3 by DPO on pairs the model made
and judged itself.  Prints the per-iteration measurements (judge agreement with held-out human
scores, win rate against the previous model judged by M1, pairs made) and the generation throughput
(candidates, judgments and answers are generated in batches), then a JSON line.

    python bench/self_reward.py [--out runs/self-reward] [--prompts-per-iter 16] [--candidates 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from train.common import TrainOptions
from train.self_reward import SelfRewardConfig, self_reward

SEED_DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/self-reward-bench")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts-per-iter", type=int, default=12)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--judgments", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per response")
    parser.add_argument("--judge-tokens", type=int, default=32, help="new tokens per judgment")
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--questions", type=int, default=80, help="MT-Bench first turns for win rates")
    parser.add_argument("--judge", default=None,
                        help="head-to-head judge, e.g. a reward model from `steer train reward` (none: no win rates)")
    parser.add_argument("--seed-limit", type=int, default=24, help="seed prompts for IFT/EFT")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    options = TrainOptions(out=args.out, epochs=1, batch_size=2, max_length=512, lora=True, lora_r=16,
                           lora_alpha=32, learning_rate=1e-4, save_steps=20, eval_fraction=0.1, progress=True)
    config = SelfRewardConfig(iterations=args.iterations, prompts_per_iter=args.prompts_per_iter,
                              candidates=args.candidates, judgments=args.judgments, max_new_tokens=args.tokens,
                              judge_tokens=args.judge_tokens, held_out=args.held_out, questions=args.questions,
                              seed_limit=args.seed_limit, judge=args.judge)
    if not args.resume and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"{args.out} is not empty: pass --resume or another --out")
    started = time.perf_counter()
    metrics = self_reward(SEED_DATA, options, config)
    seconds = time.perf_counter() - started
    print((Path(args.out) / "report.md").read_text())
    generation = metrics["generation"]
    print(f"generated {generation['tokens']} tokens in {generation['seconds']:.0f} s of generation "
          f"({generation['tokens_per_second']:.1f} tokens/s, batched); whole run {seconds / 60:.1f} min")
    print(json.dumps({"bench": "self_reward", "seconds": seconds, "config": vars(args), **metrics}))


if __name__ == "__main__":
    main()
