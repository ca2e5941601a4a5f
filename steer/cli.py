"""The `steer` command line.  User errors print one line and exit 2; internal errors exit 1."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from .errors import SteerError
from .files import os_error_of

EXIT_USER = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user error
        self.exit(EXIT_USER, f"{self.prog}: error: {message}\n")


def positive(name: str, least: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if not least <= value < 2**63:
            raise argparse.ArgumentTypeError(f"{name} must be at least {least} and below 2**63, got {value}")
        return value

    return parse


def unit_interval(name: str) -> Callable[[str], float]:
    """A number in (0, 1], checked when the flags are read (before any model loads)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {value}")
        return value

    return parse


def add_sampler_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """Flags shared by every command that runs a sampler (None where a file may give the value)."""
    # imported here, as in _generate: `steer --help` and `steer check` start without loading torch
    from .resampling import SCHEMES
    from .lm.loading import DTYPES
    from .lm.registry import backends
    from .smc import METHODS

    d = (lambda v: v) if defaults else (lambda v: None)
    parser.add_argument("--particles", "-n", type=positive("--particles"), default=d(16))
    parser.add_argument("--method", choices=METHODS, default=d("smc"))
    parser.add_argument("--resampling", choices=sorted(SCHEMES), default=d("systematic"))
    parser.add_argument("--ess", type=unit_interval("--ess"), default=d(0.5), help="resample when ESS < ess * N (smc)")
    parser.add_argument("--beam", type=positive("--beam"), default=d(3), help="children per particle (smc-steer)")
    parser.add_argument("--seed", type=positive("--seed", least=0), default=d(0))
    parser.add_argument("--model", default=None, help="local HF model directory (default: Gemma 3 270M)")
    parser.add_argument("--backend", choices=list(backends()), default=None,
                        help="; ".join(f"{b.name}: {b.description}" for b in backends().values()))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and activations (default: float32 on hf, bfloat16 on vllm)")
    parser.add_argument("--device", default=None,
                        help="where the hf backend runs: cpu, cuda, cuda:1 ... (default: $STEER_DEVICE, "
                             "else cuda when a GPU is visible, else cpu)")
    parser.add_argument("--json", action="store_true", help="one JSON object per particle, then a summary")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument("--trace", metavar="FILE.html", default=None,
                        help="write an HTML page of the run: particles, weights, ESS and resampling per step")


def sampler_options(args: argparse.Namespace) -> dict:
    options = {"particles": args.particles, "seed": args.seed, "progress": args.progress,
               "record_particles": args.trace is not None}
    if args.method == "smc":
        options.update(ess_threshold=args.ess, resampling=args.resampling)
    elif args.method == "smc-steer":
        options.update(beam=args.beam)
    return options


def strict_json(value) -> str:
    """JSON that any parser reads: infinite or NaN numbers (a dead particle's log weight) become null."""
    def clean(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
            return clean(v.item())
        return v

    return json.dumps(clean(value), allow_nan=False, ensure_ascii=False, default=str)


def print_posterior(posterior, as_json: bool, out=None) -> None:
    out = out or sys.stdout
    if as_json:
        for particle, w, lw in zip(posterior.particles, posterior.weights, posterior.log_weights):
            print(strict_json({"text": particle.result(), "weight": float(w), "log_weight": float(lw),
                               "alive": bool(math.isfinite(lw))}), file=out)
        print(strict_json({"summary": posterior.summary()}), file=out)
        return
    for text, w in posterior.distribution().items():
        print(f"{w:7.4f}  {json.dumps(text, ensure_ascii=False)}", file=out)
    s = posterior.summary()
    print(f"log_ml = {s['log_ml']:.4f}   ess = {s['ess']:.2f}/{s['particles']}   steps = {s['steps']}   "
          f"resampled = {s['resampled']}   {s['seconds']:.1f}s", file=out)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def refuse_oversized(lm, particles: int, method: str, beam: int, tokens: int) -> None:
    """Stop before sampling when the particles cannot fit in memory (at least `tokens` tokens each; with
    smc-steer, `beam` children each), instead of swapping for minutes and being killed."""
    contexts = particles * (beam if method == "smc-steer" else 1)
    each = lm.particle_bytes(tokens)
    available = available_memory()
    if available is not None and contexts * each > available:
        raise SteerError(f"{contexts:,} particles of {tokens:,} tokens need at least "
                         f"{contexts * each / 2**30:,.1f} GiB ({each / 2**20:.1f} MiB each: log-probabilities over "
                         f"{lm.vocab.size:,} tokens, keys and values) but {available / 2**30:.1f} GiB is "
                         "available; use fewer particles")


def _generate(args: argparse.Namespace) -> int:
    from .generate import Generate
    from .lm import load_model
    from .smc import run

    lm = load_model(args.model, backend=args.backend or "hf", dtype=args.dtype, device=args.device)
    program = Generate(lm, args.prompt, max_tokens=args.max_tokens, stop=args.stop)
    refuse_oversized(lm, args.particles, args.method, args.beam, len(program.context.tokens) + args.max_tokens)
    posterior = run(program, args.method, **sampler_options(args))
    print_posterior(posterior, args.json)
    if args.trace:
        posterior.write_html(args.trace, title=f"steer generate: {args.prompt}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="steer", description="Steer language models with SMC.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="sample continuations of a prompt with SMC")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", "-t", type=positive("--max-tokens"), default=32)
    gen.add_argument("--stop", default=None, help="stop at this string (excluded from the result)")
    add_sampler_options(gen)
    gen.set_defaults(handler=_generate)
    # Higher layers (the .steer language, training) add their commands through an entry point, so
    # this core module never imports them.
    for entry in sorted(entry_points(group="steer.commands"), key=lambda e: e.name):
        entry.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except SteerError as e:
        if args.debug:
            raise
        print(f"{e.cli_prefix}{e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        failure = os_error_of(e)
        if failure is not None:  # the disk filled up, a file-size limit, a permission: say what and where
            where = f": {failure.filename}" if failure.filename else ""
            print(f"steer: error: {failure.strerror or failure}{where} (files written whole before are left "
                  "as they were)", file=sys.stderr)
            return EXIT_USER
        print(f"steer: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
