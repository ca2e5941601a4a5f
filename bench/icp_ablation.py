"""In-Context Pretraining ablation: the same small model trained from scratch on ICP-ordered versus
randomly ordered windows of the vendored Wikipedia paragraphs, equal tokens and seeds.

    python bench/icp_ablation.py                  # window 1024, config small, 1 epoch
    python bench/icp_ablation.py --window 2048 --epochs 2

About a tenth of the articles are held out. Held-out perplexity is measured on two sets of windows:
the held-out paragraphs in article order (related documents share a window, the situation ICP
trains for) and the same paragraphs in random order. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.corpus import load_documents
from retrieval.llm_embedder import starts_with_bos
from steer.files import cache_dir
from train.common import TrainOptions, load_tokenizer, model_dir
from train.icp import order_corpus, pack
from train.pretrain import perplexity, pretrain

WIKI = Path(__file__).resolve().parents[1] / "examples/data/wikipedia_passages.jsonl.gz"


def write_windows(path: Path, windows: list[list[int]]) -> Path:
    with open(path, "w") as f:
        f.writelines(json.dumps({"input_ids": w}) + "\n" for w in windows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--config", default="small")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--held-out-every", type=int, default=10, help="every N-th article is held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(cache_dir() / "bench" / "icp-ablation"))
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    documents = load_documents(WIKI)
    titles = list(dict.fromkeys(d.title for d in documents))
    held_titles = set(titles[::args.held_out_every])
    train_docs = [d for d in documents if d.title not in held_titles]
    held_docs = [d for d in documents if d.title in held_titles]
    corpus = out / "train_docs.jsonl"
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in train_docs)

    tokenizer = load_tokenizer(model_dir(None))
    eos, bos = tokenizer.eos_token_id, starts_with_bos(tokenizer)
    stats = order_corpus(corpus, out / "icp", k=args.k, window=args.window, seed=args.seed, tokenizer=tokenizer)
    ordered_ids = [json.loads(line)["id"] for line in (out / "icp" / "order.jsonl").read_text().splitlines()]
    text = {d.id: d.text for d in documents}

    def tokens(ids: list[str]) -> list[list[int]]:
        return tokenizer([text[i] for i in ids], add_special_tokens=False)["input_ids"]

    rng = np.random.default_rng(args.seed)
    random_ids = [ordered_ids[i] for i in rng.permutation(len(ordered_ids))]
    random_windows, _ = pack(tokens(random_ids), eos, args.window, bos)
    random_windows = [random_windows[i] for i in np.random.default_rng(args.seed).permutation(len(random_windows))]
    arms = {"icp": out / "icp" / "windows.jsonl", "random": write_windows(out / "random_windows.jsonl", random_windows)}

    held_natural, _ = pack(tokens([d.id for d in held_docs]), eos, args.window, bos)
    shuffled = [held_docs[i].id for i in rng.permutation(len(held_docs))]
    held_random, _ = pack(tokens(shuffled), eos, args.window, bos)
    # Both held-out sets are evaluated during training (their unseen tokens count as UNK; both arms train on the same
    # documents, so their vocabularies match and the comparison is fair).
    eval_both = write_windows(out / "eval_windows.jsonl", held_natural + held_random)

    results = {}
    for arm, windows in arms.items():
        options = TrainOptions(out=str(out / f"run-{arm}"), epochs=args.epochs, batch_size=args.batch_size,
                               learning_rate=args.lr, seed=args.seed, save_steps=10_000, eval_fraction=0.0)
        run_dir = Path(options.out)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        started = time.perf_counter()
        metrics = pretrain(windows, options, config=args.config, eval_data=eval_both)
        results[arm] = {
            "windows": metrics["windows"]["train"], "train_tokens": metrics["tokens"]["train"],
            "parameters": metrics["parameters"], "train_loss": metrics["train"]["loss"],
            "ppl_article_order": perplexity(metrics["model"], held_natural),
            "ppl_random_order": perplexity(metrics["model"], held_random),
            "seconds": time.perf_counter() - started,
        }
    assert results["icp"]["train_tokens"] == results["random"]["train_tokens"], "unequal token budgets"

    print(f"\nICP ablation: {len(train_docs)} training paragraphs of {len(titles) - len(held_titles)} articles "
          f"({stats['duplicates_removed']} near-duplicates removed), {len(held_docs)} held-out paragraphs of "
          f"{len(held_titles)} articles; window {args.window}, config {args.config} "
          f"({results['icp']['parameters'] / 1e6:.1f}M parameters), {args.epochs:g} epoch(s)")
    print(f"adjacent cosine of training order: icp {stats['adjacent_cosine']['ordered']:.3f}, "
          f"random {stats['adjacent_cosine']['random']:.3f}; window purity icp "
          f"{stats['topics']['ordered']['window_purity']:.3f}, random {stats['topics']['random']['window_purity']:.3f}")
    print(f"{'order':<8}{'windows':>8}{'tokens':>10}{'train loss':>12}{'ppl (article order)':>21}"
          f"{'ppl (random order)':>20}{'minutes':>9}")
    for arm, r in results.items():
        print(f"{arm:<8}{r['windows']:>8}{r['train_tokens']:>10}{r['train_loss']:>12.3f}"
              f"{r['ppl_article_order']:>21.2f}{r['ppl_random_order']:>20.2f}{r['seconds'] / 60:>9.1f}")
    print(json.dumps({"window": args.window, "config": args.config, "epochs": args.epochs, "seed": args.seed,
                      "ordering": {"adjacent_cosine": stats["adjacent_cosine"], "topics": stats.get("topics")},
                      "results": results}))


if __name__ == "__main__":
    main()
