"""`steer train dpo --lora` on the default model in one process and in two (`accelerate launch`, DDP),
with the same global batch: final metrics side by side, and wall time.

    python bench/multiprocess_train.py [--steps 4] [--pairs 48]

Each run trains on the vendored HH-RLHF pairs; two processes on a 2-core CPU share the cores, so the
wall-time ratio says little here and much on a machine with one GPU (or many cores) per process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "hh_rlhf_harmless.jsonl.gz"


def run(processes: int, out: Path, args) -> dict:
    steer_args = ["train", "dpo", "--data", str(DATA), "--out", str(out), "--lora", "--max-steps", str(args.steps),
                  "--batch-size", str(args.batch // processes), "--lr", "1e-4", "--max-length", "256",
                  "--limit", str(args.pairs), "--eval-fraction", "0.25", "--save-steps", "1000", "--no-progress"]
    if processes == 1:
        command = [sys.executable, "-m", "steer.cli", *steer_args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), "-m", "steer.cli", *steer_args]
    threads = str(max(1, (os.cpu_count() or 2) // processes))
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": threads}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    evaluation, before = metrics["eval"], metrics["eval_before"]
    return {"processes": metrics["train"]["processes"], "steps": metrics["train"]["steps"],
            "train_loss": metrics["train"]["loss"], "eval_loss_before": before["eval_loss"],
            "eval_loss": evaluation["eval_loss"], "eval_accuracy": evaluation["eval_rewards/accuracies"],
            "eval_margin": evaluation["eval_rewards/margins"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="global batch (per process: batch / processes)")
    parser.add_argument("--pairs", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [run(n, Path(work) / f"p{n}", args) for n in (1, 2)]
    keys = ["processes", "steps", "train_loss", "eval_loss_before", "eval_loss", "eval_accuracy", "eval_margin",
            "seconds"]
    print("\n" + " | ".join(f"{k:>16s}" for k in keys))
    for r in rows:
        print(" | ".join(f"{r[k]:16.4f}" if isinstance(r[k], float) else f"{r[k]:>16}" for k in keys))
    print(json.dumps({"bench": "multiprocess_train", "global_batch": args.batch, "results": rows}))


if __name__ == "__main__":
    main()
