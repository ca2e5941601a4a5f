"""Shared command-line handling for the example scripts."""

from __future__ import annotations

import argparse

import steer


def parse(description: str, particles: int = 8, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--particles", "-n", type=int, default=particles)
    parser.add_argument("--method", choices=["smc", "smc-steer", "is"], default="smc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="local HF model directory (default: Gemma 3 270M)")
    for name, default in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    return parser.parse_args()


def report(posterior: steer.Posterior, k: int = 5) -> None:
    for text, w in posterior.top(k):
        print(f"{w:6.3f}  {text!r}")
    print(f"log_ml = {posterior.log_ml:.3f}, ess = {posterior.ess:.1f}, {posterior.seconds:.1f}s")
