"""Preference strength ("Secrets of RLHF II", arXiv 2401.06080, section 3): how strongly an ensemble of
reward models agrees with each pair's label.

M reward models are trained on M random subsets of the pairs.  For every pair, the strength is the
mean and standard deviation of r(chosen) - r(rejected) over the models that did *not* train on it
(a model that saw a mislabelled pair has partly learnt the wrong label), falling back to all models
for a pair every model saw.  Pairs are then incorrect (mean < 0), ambiguous (0 <= mean < band) or
normal.  A report draws the histogram with those thresholds and, on request, the paper's table of
validation accuracy for reward models trained on each strength-sorted decile.

Each ensemble member is saved as it finishes, so `--resume` skips the members already trained.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from steer.errors import SteerError
from steer.files import atomic_write_text, save_figure
from steer.jsonl import write_jsonl

from .common import (
    TrainOptions,
    last_checkpoint,
    load_tokenizer,
    model_dir,
    quiet_transformers,
    write_metrics,
)
from .data import Pair, fit_length, held_out, load_pairs
from .reward import fit_reward_model, pair_id, score_pairs

log = logging.getLogger(__name__)


def categorise(mean: float, band: float) -> str:
    return "incorrect" if mean < 0 else "ambiguous" if mean < band else "normal"


def _member(pairs: list[Pair], options: TrainOptions, index: int, train_fraction: float) -> dict[str, Any]:
    """Train ensemble member `index` on its random subset; its score differences for every pair."""
    out = Path(options.out) / "members" / f"{index}"
    saved = out / "scores.json"
    if saved.exists():
        return json.loads(saved.read_text())
    rng = random.Random(options.seed * 1000 + index)
    seen = sorted(rng.sample(range(len(pairs)), max(1, round(train_fraction * len(pairs)))))
    # a member killed half-way continues from its own last checkpoint
    opts = replace(options, out=str(out), seed=options.seed + index, resume=last_checkpoint(out) is not None,
                   eval_fraction=0.0)
    trainer, fit = fit_reward_model([pairs[i] for i in seen], [], opts)
    diffs = score_pairs(trainer.model, trainer.processing_class, pairs, options.max_length)
    result = {"seen": seen, "diffs": diffs.tolist(), "train": fit}
    atomic_write_text(saved, json.dumps(result))
    return result


def ensemble_strength(pairs: list[Pair], options: TrainOptions, models: int = 4,
                      train_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, number of models used) of r(chosen) - r(rejected) for every pair."""
    if models < 2:
        raise SteerError(f"preference strength needs at least 2 reward models, got --models {models}")
    if not 0 < train_fraction < 1:
        raise SteerError(f"--train-fraction must be in (0, 1), got {train_fraction}")
    diffs, unseen = np.zeros((models, len(pairs))), np.ones((models, len(pairs)), dtype=bool)
    for index in tqdm(range(models), desc="reward-model ensemble", disable=not options.progress):
        member = _member(pairs, options, index, train_fraction)
        diffs[index] = member["diffs"]
        unseen[index, member["seen"]] = False
    use = np.where(unseen.any(axis=0, keepdims=True), unseen, True)  # no unseen model: use them all
    count = use.sum(axis=0)
    mean = (diffs * use).sum(axis=0) / count
    std = np.sqrt((((diffs - mean) ** 2) * use).sum(axis=0) / count)
    return mean, std, count


def decile_accuracy(pairs: list[Pair], means: np.ndarray, validation: list[Pair],
                    options: TrainOptions, groups: int = 10) -> list[dict[str, Any]]:
    """Validation accuracy of a reward model trained on each strength-sorted group (lowest first)."""
    order = np.argsort(means, kind="stable")
    rows = []
    for g, indices in enumerate(tqdm(np.array_split(order, groups), desc="decile models",
                                     disable=not options.progress)):
        out = Path(options.out) / "deciles" / f"{g}"
        opts = replace(options, out=str(out), resume=last_checkpoint(out) is not None, eval_fraction=0.0)
        trainer, _ = fit_reward_model([pairs[i] for i in indices], [], opts)
        scores = score_pairs(trainer.model, trainer.processing_class, validation, options.max_length)
        accuracy = float((scores > 0).float().mean())
        rows.append({"decile": g + 1, "pairs": len(indices), "mean_strength": float(means[indices].mean()),
                     "validation_accuracy": accuracy})
    return rows


def plot_histogram(means: np.ndarray, band: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(means, bins=min(50, max(10, len(means) // 10)), color="#4878a8")
    ax.axvline(0.0, color="#c0392b", linestyle="--", label="incorrect < 0")
    ax.axvline(band, color="#e67e22", linestyle=":", label=f"ambiguous < {band:.3g}")
    ax.set_xlabel("preference strength: mean of r(chosen) - r(rejected) over the ensemble")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def preference_strength(data: str | Path, options: TrainOptions, *, models: int = 4, train_fraction: float = 0.5,
                        band: float | None = None, deciles: bool = False) -> dict[str, Any]:
    """Strength of every pair in `data`: writes `strength.jsonl`, `strength.png`, `report.md` and
    `metrics.json` into `options.out` and returns the metrics."""
    quiet_transformers()
    out = Path(options.out)
    tokenizer = load_tokenizer(model_dir(options.model))
    pairs, _ = fit_length(load_pairs(data, options.limit), tokenizer, options.max_length, ("chosen", "rejected"),
                          cut=False)
    scored, validation = held_out(pairs, options.eval_fraction, options.seed) if deciles else (pairs, [])
    means, stds, counts = ensemble_strength(scored, options, models, train_fraction)
    band = float(0.25 * means.std()) if band is None else float(band)
    categories = [categorise(m, band) for m in means]
    write_jsonl(out / "strength.jsonl", [
        {"id": pair_id(p), "source": p.source, "mean": float(m), "std": float(s), "models": int(c), "category": k}
        for p, m, s, c, k in zip(scored, means, stds, counts, categories)])
    plot_histogram(means, band, out / "strength.png")
    counts_by = {k: categories.count(k) for k in ("incorrect", "ambiguous", "normal")}
    table = decile_accuracy(scored, means, validation, options) if deciles else None
    summary = (f"{len(scored)} pairs, {models} reward models trained on {train_fraction:.0%} of them each; "
               f"ambiguous band [0, {band:.4g}).")
    lines = ["# Preference strength", "", summary, "", "| category | pairs | share |", "|---|---|---|"]
    lines += [f"| {k} | {n} | {n / len(scored):.1%} |" for k, n in counts_by.items()]
    if table:
        lines += ["", "| decile (weakest first) | pairs | mean strength | validation accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['decile']} | {r['pairs']} | {r['mean_strength']:.3f} | {r['validation_accuracy']:.3f} |"
                  for r in table]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    metrics = {"trainer": "strength", "data": str(data), "pairs": len(scored), "models": models,
               "train_fraction": train_fraction, "band": band, "categories": counts_by,
               "mean_strength": float(means.mean()), "mean_std": float(stds.mean()),
               "deciles": table, "validation_pairs": len(validation), "settings": options.as_dict()}
    write_metrics(out, metrics)
    return metrics
