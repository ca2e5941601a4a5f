"""JSON Schema structured output, measured the way JSONSchemaBench measures engines, beside llguidance.

For each schema: compile it (time to first mask, TTFM), then walk every test instance, serialised as
`json.dumps` writes it and tokenized by Gemma's tokenizer, through the mask that generation uses
(`json_schema(...)`'s mask in a context, intersected with the base restriction: canonical
tokenization, no control tokens), timing every mask (TBM).  A valid instance counts as accepted when
every token and end-of-text are allowed; an invalid one as rejected when a token or end-of-text is
refused.  Where very many tokens are allowed, generation also checks the token it draws for a
canonical continuation (the mask was not looked ahead of there): `with_check_*` is the mask plus
that check of the walked token, per step.  A schema that the strict compiler refuses is compiled in lenient mode, where the final
`jsonschema` check gates end-of-text.  llguidance alone runs the same walk on the same tokens.

    python bench/json_schemas.py --data DIR [--limit N] [--suite]

DIR holds MaskBench files (`{"schema", "tests": [{"valid", "data"}]}`), or with `--suite` the JSON
Schema Test Suite's files (`[{"schema", "tests": [...]}]`, one file per keyword); the suite mode also
prints how many tests pass per keyword file.  Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from llguidance import LLMatcher
from tqdm import tqdm

from steer import SteerError
from steer.constraints import engine
from steer.constraints.base import NOTHING_FITS
from steer.lm.base import LanguageModel, Vocabulary
from steer.lm.loading import default_model_path
from steer.constraints.target import base_mask, restricted
from steer.context import LMContext


class TokenizerOnly(LanguageModel):
    """The default model's vocabulary without its weights: masks need no forward pass."""

    def __init__(self):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        self.vocab = Vocabulary.from_tokenizer(self.tokenizer, size=262_144)
        self.max_length, self.name = 1 << 20, "gemma-3-270m tokenizer"

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.vocab.bos_id, *ids] if bos else ids

    def advance(self, requests) -> None:
        raise NotImplementedError("masks only")


def cases(data: Path, suite: bool, limit: int | None):
    """(name, group, schema, tests) per schema; `group` is the keyword file in suite mode."""
    files = sorted(data.glob("*.json"))
    out = []
    for path in files:
        loaded = json.loads(path.read_text())
        if suite:
            for i, case in enumerate(loaded):
                out.append((f"{path.stem}[{i}]", path.stem, case["schema"], case["tests"]))
        else:
            out.append((path.stem, path.stem, loaded["schema"], loaded["tests"]))
    return out[:limit] if limit else out


def steer_walk(lm: TokenizerOnly, constraint, ids: list[int], times: list[float],
               engine_times: list[float], step_times: list[float]) -> bool:
    """Whether the mask generation uses allows every token of `ids` and then end-of-text (`times`: the
    whole mask; `engine_times`: the constraint's part, which intersects the base restriction itself
    where it can; `step_times`: the mask and the check generation makes of the drawn token where very
    many tokens are allowed, which the mask was not looked ahead of)."""
    ctx = LMContext(lm, [lm.vocab.bos_id], heal=False)
    eos = next(iter(lm.vocab.eos_ids))
    for token in [*ids, eos]:
        constraint.state(ctx)  # reads the last token (untimed, as llguidance's `consume_token` below)
        start = time.perf_counter()
        mask = constraint.allowed_in(ctx)
        engine_times.append(time.perf_counter() - start)
        mask = restricted(mask, base_mask(ctx))
        times.append(time.perf_counter() - start)
        allowed = bool(mask.numpy()[token])  # (reading one entry is not part of computing the mask)
        checked = time.perf_counter()
        check = constraint.token_check(ctx) if allowed and token != eos else None
        if check is not None and check is not NOTHING_FITS:
            check(token)  # (its verdict only steers sampling: the mask alone decides acceptance)
        step_times.append(times[-1] + time.perf_counter() - checked)
        if not allowed:
            return False
        if token != eos:
            ctx.extend([token])
    return True


def llguidance_walk(tokenizer, grammar: str, ids: list[int], times: list[float]) -> bool:
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    eos = tokenizer.eos_token
    for token in [*ids, eos]:
        start = time.perf_counter()
        mask = engine.bitmask(matcher, tokenizer.vocab_size)
        times.append(time.perf_counter() - start)
        allowed = bool(mask[token])
        if not allowed:
            return False
        if token != eos:
            matcher.consume_token(token)
    return True


def state_bytes(lm: TokenizerOnly, particles: int = 64) -> float:
    """Bytes per particle's matcher state: `particles` copies of a context half-way through a JSON
    document, each forked by one different token (what resampling then sampling leaves).  The caches
    shared by every particle of a vocabulary (the base mask after each last token: bounded, and built
    by unconstrained steps too) are filled before measuring.  The larger
    of the memory Python and NumPy allocate for them (traced: masks and caches) and the growth of the
    resident size (which also sees the Rust engine's own state, but not memory reused from the heap)."""
    import copy
    import gc
    import tracemalloc

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
              "items": {"type": "string"}}, "age": {"type": "integer"}}}
    constraint = engine.json_schema(schema)
    ctx = LMContext(lm, [lm.vocab.bos_id], heal=False)
    for token in lm.encode('{"name": "Ada Lovelace", "tags": ["math', bos=False):
        constraint.allowed_in(ctx)
        ctx.extend([token])
    allowed = [int(i) for i in np.flatnonzero(constraint.allowed_in(ctx).numpy())][:particles]

    def fork(k: int) -> LMContext:  # particle k: a copy that draws its own next token
        twin = copy.deepcopy(ctx)
        twin.extend([allowed[k % len(allowed)]])
        return twin

    for k in range(particles):  # the shared per-vocabulary caches (base masks per last token) first
        base_mask(fork(k))
    gc.collect()
    before = rss()
    tracemalloc.start()
    copies = []
    for k in range(particles):
        twin = fork(k)
        constraint.allowed_in(twin)
        copies.append(twin)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return max(traced, rss() - before) / particles


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="the first N schemas only")
    parser.add_argument("--suite", action="store_true", help="DIR is the JSON Schema Test Suite")
    parser.add_argument("--memory", action="store_true", help="also report bytes per particle's matcher state")
    parser.add_argument("--key-order", choices=["schema", "any"], default="schema",
                        help="steer's json_schema(key_order=...): llguidance's schema order, or any order")
    args = parser.parse_args()

    lm = TokenizerOnly()
    # (first, while the heap is fresh: resident growth after the walks would reuse freed memory)
    memory = round(state_bytes(lm)) if args.memory else None
    start = time.perf_counter()
    tokenizer = engine.ll_tokenizer(lm.vocab)
    tokenizer_s = time.perf_counter() - start
    stats = {name: defaultdict(list) for name in ("steer", "llguidance")}
    per_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    lenient_used = 0
    all_cases = cases(args.data, args.suite, args.limit)
    for name, group, schema, tests in tqdm(all_cases, desc="schemas"):
        s, g = stats["steer"], stats["llguidance"]
        s["schemas"].append(1)
        # steer: strict, else lenient with the final check
        start = time.perf_counter()
        constraint = None
        try:
            constraint = engine.json_schema(schema, key_order=args.key_order)
        except SteerError:
            try:
                constraint = engine.json_schema(schema, lenient=True, key_order=args.key_order)
                lenient_used += 1
            except SteerError:
                pass
        if constraint is not None:
            ctx = LMContext(lm, [lm.vocab.bos_id], heal=False)
            constraint.allowed_in(ctx)
            s["ttfm"].append(time.perf_counter() - start)
        s["compiled"].append(constraint is not None)
        # llguidance alone, with the same JSON format
        start = time.perf_counter()
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=engine.JSON_FORMAT)
        except ValueError:  # e.g. a boolean schema: no options can be applied to it
            grammar = None
        ok = grammar is not None and not LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)[0]
        if ok:
            engine.bitmask(LLMatcher(tokenizer, grammar, log_level=0), tokenizer.vocab_size)
            g["ttfm"].append(time.perf_counter() - start)
        g["compiled"].append(ok)
        for test in tests:
            ids = lm.encode(json.dumps(test["data"]), bos=False)
            key = "valid" if test["valid"] else "invalid"
            if constraint is not None:
                accepted = steer_walk(lm, constraint, ids, s["tbm"], s["engine_tbm"], s["step"])
                s[key].append(accepted == test["valid"])
                per_group[group][0] += accepted == test["valid"]
            per_group[group][1] += 1
            if ok:
                accepted = llguidance_walk(tokenizer, grammar, ids, g["tbm"])
                g[key].append(accepted == test["valid"])

    def summary(st, prefix: str = "") -> dict:
        return {
            f"{prefix}schemas": len(st["compiled"]),
            f"{prefix}compiled_share": round(float(np.mean(st["compiled"])), 4) if st["compiled"] else 0.0,
            f"{prefix}valid_accepted_share": round(float(np.mean(st["valid"])), 4) if st["valid"] else None,
            f"{prefix}valid_tests": len(st["valid"]),
            f"{prefix}invalid_rejected_share": round(float(np.mean(st["invalid"])), 4) if st["invalid"] else None,
            f"{prefix}invalid_tests": len(st["invalid"]),
            f"{prefix}tbm_p50_us": round(percentile(st["tbm"], 50) * 1e6, 1),
            f"{prefix}tbm_p99_us": round(percentile(st["tbm"], 99) * 1e6, 1),
            f"{prefix}ttfm_p50_ms": round(percentile(st["ttfm"], 50) * 1e3, 2),
            f"{prefix}masks": len(st["tbm"]),
            **({"engine_tbm_p50_us": round(percentile(st["engine_tbm"], 50) * 1e6, 1),
                "engine_tbm_p99_us": round(percentile(st["engine_tbm"], 99) * 1e6, 1),
                "with_check_p50_us": round(percentile(st["step"], 50) * 1e6, 1),
                "with_check_p99_us": round(percentile(st["step"], 99) * 1e6, 1)} if not prefix else {}),
        }

    mine, theirs = summary(stats["steer"]), summary(stats["llguidance"], "llguidance_")
    if args.memory:
        mine["state_bytes_per_particle_64"] = memory
        print(f"matcher state per particle (64 particles, JSON half-written): {mine['state_bytes_per_particle_64']} B")
    print(f"\n{'engine':<12}{'compiled':>10}{'valid acc.':>12}{'invalid rej.':>14}{'TBM p50 µs':>12}"
          f"{'TBM p99 µs':>12}{'TTFM p50 ms':>13}")
    for label, row, p in (("steer", mine, ""), ("llguidance", theirs, "llguidance_")):
        print(f"{label:<12}{row[p + 'compiled_share']:>10}{row[p + 'valid_accepted_share']!s:>12}"
              f"{row[p + 'invalid_rejected_share']!s:>14}{row[p + 'tbm_p50_us']:>12}{row[p + 'tbm_p99_us']:>12}"
              f"{row[p + 'ttfm_p50_ms']:>13}")
    print(f"(steer's constraint alone, which intersects the base restriction itself: TBM p50 {mine['engine_tbm_p50_us']} µs, "
          f"p99 {mine['engine_tbm_p99_us']} µs; schemas compiled in lenient mode: {lenient_used}; "
          f"llguidance tokenizer built in {tokenizer_s:.1f} s)")
    print(f"(with the check generation makes of a drawn token where very many are allowed: p50 "
          f"{mine['with_check_p50_us']} µs, p99 {mine['with_check_p99_us']} µs)")
    if args.suite:
        print(f"\n{'keyword file':<28}{'passed':>8}{'tests':>7}")
        for group, (passed, total) in sorted(per_group.items()):
            print(f"{group:<28}{passed:>8}{total:>7}")
    print(json.dumps({**mine, **theirs, "lenient_schemas": lenient_used, "key_order": args.key_order,
                      "suite": {k: v for k, v in per_group.items()} if args.suite else None}))


if __name__ == "__main__":
    main()
