"""JSON generation under real schemas on the default model: SMC with llguidance's masks.

For each schema that compiles (strict, else lenient with the final check): N particles write a JSON
document after the prompt "Output a JSON object for this schema:" + the schema + a newline, within
`max_tokens`.  Reports per schema whether the run finished, the weighted share of final particles
valid under `jsonschema`, the ESS, the share of particles that died, and the seconds it took.

    python bench/json_generate.py --data DIR [--schemas 40] [--particles 4] [--max-tokens 256]

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import steer
from steer import SteerError
from steer.constraints import engine


def compiled(schemas_dir: Path, limit: int):
    """The first `limit` schemas that compile, taken evenly over the sorted files (the sample's file
    names group its sources: BFCL, GitHub, Glaive, Kubernetes, Snowplow, JSONSchemaStore, ...)."""
    paths = sorted(schemas_dir.glob("*.json"))
    stride = max(1, len(paths) // max(limit, 1))
    for path in paths[::stride]:
        schema = json.loads(path.read_text())["schema"]
        for lenient in (False, True):
            try:
                yield path.stem, schema, engine.json_schema(schema, lenient=lenient)
                break
            except SteerError:
                continue
        limit -= 1
        if limit == 0:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--schemas", type=int, default=40)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lm = steer.load_model()
    rows = []
    for name, schema, constraint in compiled(args.data, args.schemas):
        prompt = f"Output a JSON object for this schema:\n{json.dumps(schema)}\n"
        valid = engine.schema_validator(schema)
        start = time.perf_counter()
        try:
            post = steer.smc(steer.Generate(lm, prompt, args.max_tokens, constraint=constraint),
                             particles=args.particles, seed=args.seed)
            live = np.isfinite(post.log_weights)
            share = float(sum(w for p, w in zip(post.particles, post.weights) if valid(p.context.text)))
            row = {"schema": name, "finished": True, "valid_share": round(share, 4), "ess": round(post.ess, 2),
                   "dead_share": round(1 - live.mean(), 3), "log_ml": round(post.log_ml, 2)}
        except steer.ParticlesDiedError as e:
            row = {"schema": name, "finished": False, "valid_share": None, "ess": 0.0, "dead_share": 1.0,
                   "log_ml": None, "error": str(e)[:120]}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{name:<44}{row['finished']!s:>9}{row['valid_share']!s:>8}{row['dead_share']:>7}{row['seconds']:>8}"
              f"  {row.get('error', '')[-70:]}", flush=True)
    finished = [r for r in rows if r["finished"]]
    summary = {
        "schemas": len(rows), "finished": len(finished),
        "valid_share_mean": round(float(np.mean([r["valid_share"] for r in finished])), 4) if finished else None,
        "dead_share_mean": round(float(np.mean([r["dead_share"] for r in rows])), 3) if rows else None,
        "seconds_per_schema": round(float(np.mean([r["seconds"] for r in rows])), 1) if rows else None,
        "particles": args.particles, "max_tokens": args.max_tokens,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
