"""Where the time of one SMC step goes, for each backend and dtype, against what the hardware allows.

Runs a constrained program (every word at most five letters; N particles, T tokens) and times, per
step: the model's forward pass, the LM head, log-softmax, sampling (the pre-drawn tokens), masks, and
the rest (Python bookkeeping: the scheduler, programs, weights, copies).  On vLLM the engine step holds
the forward pass and the LM head together.  The hardware limit of a step is the larger of
(weight bytes streamed per step / measured memory bandwidth) and (FLOPs per step / measured matmul
throughput in that dtype).

    python bench/profile_step.py [--configs hf:float32 hf:bfloat16 vllm:bfloat16] [--particles 16] [--tokens 32]

vLLM configurations need the environment made by scripts/install-vllm.sh.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402

import steer  # noqa: E402
import steer.distributions  # noqa: E402
from steer.lm.loading import DTYPES  # noqa: E402


class Timers:
    """Wall time spent inside wrapped callables, by component; nested time is not counted twice."""

    def __init__(self, sync=lambda: None):
        self.seconds = defaultdict(float)
        self._stack: list[list[float]] = []
        self.sync = sync  # on a GPU, wait for queued kernels so that time lands on the part that queued them

    def wrap(self, owner, name, component):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._stack.append([0.0])
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                elapsed = time.perf_counter() - start
                inner = self._stack.pop()[0]
                self.seconds[component] += elapsed - inner
                if self._stack:
                    self._stack[-1][0] += elapsed

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


def instrument(lm, timers):
    """Wrap the parts of a step; returns a function that undoes it."""
    undo = [
        timers.wrap(steer.distributions, "base_mask", "masks"),
        timers.wrap(steer.distributions, "_log_mass", "masks"),
        timers.wrap(steer.masks, "resolve", "masks"),
    ]
    if isinstance(lm, steer.HFLanguageModel):
        import steer.lm.hf as hf

        undo += [timers.wrap(lm, "_forward", "model forward"),
                 timers.wrap(lm._head, "forward", "LM head"),
                 timers.wrap(hf.torch, "log_softmax", "log-softmax"),
                 timers.wrap(hf, "categorical", "sampling")]
    else:
        import steer.lm.vllm as vl

        undo += [timers.wrap(lm.engine, "step", "engine step (forward + LM head)"),
                 timers.wrap(vl.torch, "log_softmax", "log-softmax"),
                 timers.wrap(vl, "_draw_rows", "sampling"),
                 timers.wrap(vl, "categorical", "sampling")]
    return lambda: [u() for u in undo]


def hardware(dtype: torch.dtype, vocab: int, hidden: int, n: int, device: str = "cpu") -> dict[str, float]:
    """Measured memory bandwidth (GB/s) and matmul throughput (GFLOP/s) at the LM head's shape."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x = torch.ones(2**27, dtype=torch.float32, device=device)  # 512 MiB, well past the caches
    x.sum()
    sync()
    start = time.perf_counter()
    for _ in range(5):
        x.sum()
    sync()
    bandwidth = 5 * x.numel() * 4 / (time.perf_counter() - start) / 1e9
    a, w = torch.randn(n, hidden, dtype=dtype, device=device), torch.randn(hidden, vocab, dtype=dtype, device=device)
    a @ w
    sync()
    start = time.perf_counter()
    for _ in range(5):
        a @ w
    sync()
    flops = 5 * 2 * n * hidden * vocab / (time.perf_counter() - start) / 1e9
    return {"bandwidth_gb_s": bandwidth, "matmul_gflop_s": flops}


def model_shape(path) -> dict[str, int]:
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"vocab": config.vocab_size, "hidden": config.hidden_size, "body": total - embedding, "head": embedding}


def profile(config: str, args) -> dict:
    backend, dtype = config.split(":")
    device = None if backend == "vllm" else args.device or steer.lm.hf.default_device()
    lm = steer.load_model(args.model, backend=backend, dtype=dtype, device=device)
    program = lambda: steer.Generate(lm, "My favorite writing style is", args.tokens,  # noqa: E731
                                     mask=steer.masks.word_length(max=5))
    steer.smc(program(), particles=args.particles, seed=0)  # warm-up
    on_gpu = device is not None and device.startswith("cuda")
    timers = Timers(torch.cuda.synchronize if on_gpu else lambda: None)
    undo = instrument(lm, timers)
    try:
        start = time.perf_counter()
        posterior = steer.smc(program(), particles=args.particles, seed=1)
        total = time.perf_counter() - start
    finally:
        undo()
    steps = len(posterior.trace)
    parts = {k: v / steps for k, v in timers.seconds.items()}
    parts["Python bookkeeping"] = total / steps - sum(parts.values())
    shape = model_shape(args.model or steer.lm.default_model_path())
    hw = hardware(DTYPES[dtype], shape["vocab"], shape["hidden"], args.particles, device or "cpu")
    bytes_per_step = (shape["body"] + shape["head"]) * DTYPES[dtype].itemsize
    flops_per_step = 2 * (shape["body"] + shape["head"]) * args.particles
    limit = max(bytes_per_step / (hw["bandwidth_gb_s"] * 1e9), flops_per_step / (hw["matmul_gflop_s"] * 1e9))
    if backend == "vllm":
        del lm
    where = torch.cuda.get_device_name(device) if on_gpu else f"{torch.get_num_threads()} CPU threads"
    return {"config": config, "device": where, "step_ms": 1000 * total / steps,
            "parts_ms": {k: 1000 * v for k, v in parts.items()},
            "limit_ms": 1000 * limit, "weight_mb": bytes_per_step / 1e6, "gflop": flops_per_step / 1e9, **hw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["hf:float32", "hf:bfloat16"],
                        help="backend:dtype pairs (vllm:bfloat16 needs vLLM installed)")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None, help="transformers' device (default: cuda when visible)")
    args = parser.parse_args()
    results = [profile(c, args) for c in args.configs]
    print(f"\nN={args.particles} particles, {args.tokens} tokens, every word <= 5 letters; ms per SMC step")
    for r in results:
        print(f"\n{r['config']} on {r['device']}: {r['step_ms']:.1f} ms/step; hardware limit {r['limit_ms']:.1f} ms "
              f"({r['weight_mb']:.0f} MB of weights at {r['bandwidth_gb_s']:.1f} GB/s, {r['gflop']:.1f} GFLOP at "
              f"{r['matmul_gflop_s']:.0f} GFLOP/s); step / limit = {r['step_ms'] / r['limit_ms']:.2f}")
        for name, ms in sorted(r["parts_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:34s} {ms:8.2f} ms  {100 * ms / r['step_ms']:5.1f}%")
    print(json.dumps({"bench": "profile_step", "particles": args.particles, "tokens": args.tokens,
                      "results": [{k: (round(v, 3) if isinstance(v, float) else
                                       {a: round(b, 3) for a, b in v.items()} if isinstance(v, dict) else v)
                                   for k, v in r.items()} for r in results]}))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
