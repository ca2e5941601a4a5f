"""`steer run FILE.steer` and `steer check FILE.steer` (registered with the core CLI by entry point)."""

from __future__ import annotations

import argparse
import sys

from steer.cli import add_sampler_options, positive, print_posterior, refuse_oversized
from steer.errors import SteerError

from .interpreter import TIME_LIMIT
from .script import Script


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--set needs NAME=VALUE, got {text!r}")
    return name.strip(), value


def add_commands(commands) -> None:
    run = commands.add_parser("run", help="run a .steer program and print its posterior")
    run.add_argument("file", metavar="FILE.steer")
    run.add_argument("--set", dest="inputs", action="append", type=_assignment, default=[],
                     metavar="NAME=VALUE", help="give an input a value (repeatable)")
    run.add_argument("--max-tokens", "-t", type=positive("--max-tokens"), default=None,
                     help="most tokens a particle samples (overrides the file)")
    add_sampler_options(run, defaults=False)  # unset flags leave the file's settings in force
    run.add_argument("--time-limit", type=positive("--time-limit", least=0), default=int(TIME_LIMIT),
                     metavar="SECONDS", help=f"wall-clock budget of the run (default {TIME_LIMIT:g}; 0: none)")
    run.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                     help="also allow reward_model / retriever / model paths under DIR (repeatable); "
                          "otherwise they must stay inside the program's folder")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="parse and check a .steer program without running it")
    check.add_argument("file", metavar="FILE.steer")
    check.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                       help="also allow paths under DIR, as `run --allow-path` does")
    check.set_defaults(handler=_check)


def _run(args: argparse.Namespace) -> int:
    script = Script.from_file(args.file, allow_paths=args.allow_path)
    inputs = dict(args.inputs)
    if len(inputs) != len(args.inputs):
        raise SteerError("an input is given twice with --set")
    values = script.input_values(inputs)
    # Check the settings before the (slow) model load, so a bad flag fails at once.
    s = script.settings(values, method=args.method, particles=args.particles, ess=args.ess,
                        resampling=args.resampling, seed=args.seed, beam=args.beam, max_tokens=args.max_tokens)
    script.check_paths()
    lm = script.load_model(path=args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    refuse_oversized(lm, s["particles"], s["method"], s["beam"], s["max_tokens"])
    posterior = script.run(lm, inputs=values, progress=args.progress, record_particles=args.trace is not None,
                           time_limit=args.time_limit or None,
                           method=args.method, particles=args.particles, ess=args.ess,
                           resampling=args.resampling, seed=args.seed, beam=args.beam,
                           max_tokens=args.max_tokens)
    print_posterior(posterior, args.json)
    if args.trace:
        posterior.write_html(args.trace, title=f"steer run {args.file}")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Every static check `run` makes: the program, its paths, and its settings where the inputs they
    use have defaults."""
    script = Script.from_file(args.file, allow_paths=args.allow_path)
    script.check_paths()
    script.check_settings()
    inputs = ", ".join(f"{s.name}: {s.type}" for s in script.inputs.values()) or "none"
    sampler = script.module.samplers[0].method if script.module.samplers else "smc (default)"
    print(f"{args.file}: ok (inputs: {inputs}; sampler: {sampler})", file=sys.stdout)
    return 0
