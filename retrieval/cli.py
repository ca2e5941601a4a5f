"""`steer index build|search`: dense-retrieval indexes from the command line."""

from __future__ import annotations

import argparse
import json

from steer.cli import positive, strict_json

from .index import KINDS

# The commands import the embedders and faiss when they run, so `steer --help` does not wait for them.


def _build(args: argparse.Namespace) -> int:
    from .loading import load_embedder
    from .retriever import build_retriever

    retriever = build_retriever(args.docs, args.out, embedder=load_embedder(args.embedder), kind=args.kind,
                                batch_size=args.batch_size, limit=args.limit, progress=not args.no_progress,
                                **({"nlist": args.nlist} if args.nlist else {}),
                                **({"nprobe": args.nprobe} if args.nprobe else {}))
    meta = retriever.index.meta
    print(json.dumps({"out": args.out, "documents": len(retriever.documents), "kind": meta.kind,
                      "dim": meta.dim, "embedder": meta.embedder}))
    return 0


def _search(args: argparse.Namespace) -> int:
    from .retriever import Retriever

    retriever = Retriever.load(args.index)
    for rank, hit in enumerate(retriever.search(args.query, args.k), 1):
        if args.json:
            print(strict_json({"rank": rank, "id": hit.id, "score": hit.score, "title": hit.title, "text": hit.text}))
        else:
            title = f" [{hit.title}]" if hit.title else ""
            text = hit.text if len(hit.text) <= 160 else hit.text[:157] + "..."
            print(f"{rank:2d}. {hit.score:.3f}  {hit.id}{title}  {text}")
    return 0


def add_commands(commands) -> None:
    index = commands.add_parser("index", help="build and search dense-retrieval indexes")
    sub = index.add_subparsers(dest="index_command", required=True, parser_class=type(index))

    build = sub.add_parser("build", help="embed a JSONL corpus (id, text[, title]) and index it")
    build.add_argument("--docs", required=True, help="JSONL documents with 'text' (and 'id', 'title')")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--embedder", default=None, help="'minilm' (default) or a sentence-transformers directory")
    build.add_argument("--kind", choices=KINDS, default="auto",
                       help="flat (exact), ivf, hnsw; auto: flat below 1e5 documents, ivf above")
    build.add_argument("--nlist", type=positive("--nlist"), default=None, help="IVF lists (default ~4*sqrt(n))")
    build.add_argument("--nprobe", type=positive("--nprobe"), default=None, help="IVF lists searched per query")
    build.add_argument("--batch-size", type=positive("--batch-size"), default=64)
    build.add_argument("--limit", type=positive("--limit"), default=None, help="index only the first N documents")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(handler=_build)

    search = sub.add_parser("search", help="the top-k passages of an index for a query")
    search.add_argument("index", help="index directory written by `steer index build`")
    search.add_argument("query")
    search.add_argument("-k", type=positive("-k"), default=5)
    search.add_argument("--json", action="store_true", help="one JSON object per hit")
    search.set_defaults(handler=_search)
