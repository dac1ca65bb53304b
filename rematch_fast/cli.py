"""The `rematch-fast` command line: init-tiny, embed, search, rerank, demo.

Exit status: 0 done; 1 error (nothing written); 2 bad command line;
3 done, but some rows were rejected (listed with their reasons in the rejects file).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .backends import registered_backends
from .checkpoint import ARCHES
from .config import INDEX_DTYPES, MODEL_DTYPES
from .errors import InputError, ReMatchError, TruncationWarning

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTS = 0, 1, 2, 3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_model(args):
    from .api import ReMatch

    return ReMatch.from_pretrained(args.checkpoint, backend=args.backend, device=args.device, dtype=args.dtype)


def _finish(rejects, rejects_path: Path, what: str) -> int:
    from .jsonl import write_jsonl

    if not rejects:
        if rejects_path.exists():
            rejects_path.unlink()  # a stale file from an earlier run would mislead
        return EXIT_OK
    write_jsonl(rejects_path, [r.to_json() for r in rejects])
    _log(f"{len(rejects)} {what} rejected; reasons in {rejects_path}")
    return EXIT_REJECTS


# -- commands ----------------------------------------------------------------
def cmd_init_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    overrides = {}
    for kv in args.set or []:
        key, sep, value = kv.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise InputError(f"--set takes KEY=INTEGER, got {kv!r}")
        overrides[key] = int(value)
    path = make_tiny_checkpoint(args.dir, arch=args.arch, seed=args.seed, **overrides)
    print(f"tiny {args.arch} checkpoint (random weights, seed {args.seed}) written to {path}")
    return EXIT_OK


def cmd_embed(args) -> int:
    from .jsonl import read_rows
    from .pipeline import embed_rows
    from .store import EmbeddingStore

    rows, rejects = read_rows(args.corpus)
    model = _load_model(args)
    ids, emb, more = embed_rows(model, rows, args.side, args.batch_size, not args.quiet, _log)
    rejects += more
    if not ids:
        raise InputError(f"no row of {args.corpus} could be embedded ({len(rejects)} rejected)")
    EmbeddingStore(ids, emb, args.side, str(Path(args.checkpoint).resolve())).save(args.out)
    print(f"embedded {len(ids)} rows ({args.side}) into {args.out}")
    return _finish(sorted(rejects, key=lambda r: r.line), Path(args.rejects or Path(args.out) / "rejects.jsonl"), "rows")


def cmd_search(args) -> int:
    from .index import Index
    from .jsonl import read_rows, write_jsonl
    from .pipeline import embed_rows

    index = Index.from_store(args.index, device=args.device, dtype=args.index_dtype)
    rows, rejects = read_rows(args.queries)
    model = _load_model(args)
    qids, q, more = embed_rows(model, rows, "query", args.batch_size, not args.quiet, _log)
    rejects += more
    k = min(args.k, len(index))
    if k < args.k:
        _log(f"the index holds {len(index)} vectors: returning top {k}, not {args.k}")
    records = []
    if qids:
        scores, rows_ = index.search(q.unit, k)
        for qid, s, ids in zip(qids, scores.tolist(), index.ids_of(rows_)):
            records.append({"query_id": qid, "hits": [{"id": i, "score": round(v, 6)} for v, i in zip(s, ids)]})
    write_jsonl(args.out, records)
    print(f"searched {len(records)} queries, top {k}, into {args.out}")
    return _finish(sorted(rejects, key=lambda r: r.line), Path(args.rejects or str(args.out) + ".rejects.jsonl"), "queries")


def cmd_rerank(args) -> int:
    from .jsonl import Reject, read_rows, write_jsonl
    from .store import EmbeddingStore

    queries, query_rejects = read_rows(args.queries)
    query_by_id = {r.id: r for r in queries}
    bad_query = {r.id: r.reason for r in query_rejects if r.id is not None}  # matters only if a hit row needs it
    rejects = []
    docs_by_id, stored = {}, None
    if args.doc_view == "feat" and args.index:
        stored = EmbeddingStore.load(args.index)
        if stored.side != "document":
            raise InputError(f"{args.index} holds {stored.side!r} embeddings; the document view needs 'document'")
        stored_row = {d: i for i, d in enumerate(stored.ids)}
    elif args.corpus:
        docs, doc_rejects = read_rows(args.corpus)
        docs_by_id = {r.id: r for r in docs}
        if doc_rejects:
            _log(f"{len(doc_rejects)} corpus rows are malformed and cannot be candidates")
    else:
        raise InputError("rerank needs --corpus (or, with --doc-view feat, --index)")
    hits, hit_rejects = _read_hits(args.hits)
    rejects += hit_rejects
    model = _load_model(args)
    records = []
    for line, raw, h in tqdm(hits, desc="rerank", unit="query", disable=args.quiet):
        try:
            if h["query_id"] in bad_query:
                raise InputError(f"query {h['query_id']!r} is unusable: {bad_query[h['query_id']]}")
            if h["query_id"] not in query_by_id:
                raise InputError(f"query id {h['query_id']!r} is not in {args.queries}")
            cand_ids = [c["id"] for c in h["hits"]]
            if stored is not None:
                missing = [c for c in cand_ids if c not in stored_row]
                candidates = stored.embeddings[[stored_row[c] for c in cand_ids]] if not missing else None
            else:
                missing = [c for c in cand_ids if c not in docs_by_id]
                candidates = [docs_by_id[c].item for c in cand_ids] if not missing else None
            if missing:
                raise InputError(f"candidate ids {missing} are not in the corpus")
            p = model.match(query_by_id[h["query_id"]].item, candidates, args.query_view, args.doc_view, args.batch_size)
        except InputError as e:
            rejects.append(Reject(line, h.get("query_id") if isinstance(h, dict) else None, str(e), raw))
            continue
        ranked = sorted(
            ({**c, "p_yes": round(float(v), 6)} for c, v in zip(h["hits"], p.tolist())), key=lambda c: -c["p_yes"]
        )
        records.append({"query_id": h["query_id"], "hits": ranked})
    write_jsonl(args.out, records)
    print(f"reranked {len(records)} queries into {args.out}")
    return _finish(sorted(rejects, key=lambda r: r.line), Path(args.rejects or str(args.out) + ".rejects.jsonl"), "queries")


def _read_hits(path):
    from .jsonl import Reject, json_lines

    good, bad = [], []
    for n, line, h in json_lines(path, "hits file"):
        try:
            if isinstance(h, json.JSONDecodeError):
                raise InputError(str(h))
            if not isinstance(h, dict) or "query_id" not in h or not isinstance(h.get("hits"), list):
                raise InputError("a hits row needs 'query_id' and a list 'hits'")
            if not all(isinstance(c, dict) and "id" in c for c in h["hits"]):
                raise InputError("every hit needs an 'id'")
            good.append((n, line, h))
        except InputError as e:
            bad.append(Reject(n, None, f"bad hits row: {e}", line))
    return good, bad


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(arch=args.arch, cache_dir=Path(args.cache_dir).expanduser(), out=Path(args.out), device=args.device)
    return EXIT_OK


# -- parser -----------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="reference",
                   help=f"implementation to run, one of {registered_backends()} (default: reference)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(MODEL_DTYPES), help="model dtype (default: float32)")
    p.add_argument("--batch-size", type=int, default=64, help="most sequences per forward pass (default: 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rematch-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write a random-weight tiny checkpoint of a real architecture")
    p.add_argument("dir")
    p.add_argument("--arch", default="qwen2.5-vl", choices=ARCHES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=INT", help="size override, e.g. --set hidden_size=128")
    p.set_defaults(func=cmd_init_tiny)

    p = sub.add_parser("embed", help="embed a JSONL corpus into an embedding folder")
    p.add_argument("checkpoint")
    p.add_argument("corpus", help="JSONL rows {id, text, image}; image paths relative to the file")
    p.add_argument("--out", required=True, help="embedding folder to write")
    p.add_argument("--side", default="document", choices=["query", "document"])
    p.add_argument("--rejects", help="where rejected rows go (default: OUT/rejects.jsonl)")
    _model_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="embed JSONL queries and find their top-k in an embedding folder")
    p.add_argument("checkpoint")
    p.add_argument("queries")
    p.add_argument("--index", required=True, help="embedding folder written by `embed`")
    p.add_argument("--out", required=True, help="hits JSONL to write")
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--index-dtype", default="float32", choices=sorted(INDEX_DTYPES),
                   help="how the index holds the corpus on --device (int8: per-row quantized; default float32)")
    p.add_argument("--rejects", help="where rejected queries go (default: OUT.rejects.jsonl)")
    _model_options(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("rerank", help="score each query's hits with generative matching, p(yes)")
    p.add_argument("checkpoint")
    p.add_argument("--queries", required=True)
    p.add_argument("--hits", required=True, help="hits JSONL from `search` (or any {query_id, hits:[{id}]})")
    p.add_argument("--corpus", help="the corpus JSONL (needed for the raw document view)")
    p.add_argument("--index", help="document embedding folder (used by --doc-view feat)")
    p.add_argument("--query-view", default="raw", choices=["raw", "feat"])
    p.add_argument("--doc-view", default="raw", choices=["raw", "feat"])
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", help="where rejected queries go (default: OUT.rejects.jsonl)")
    _model_options(p)
    p.set_defaults(func=cmd_rerank)

    p = sub.add_parser("demo", help="tiny end-to-end run: build, embed, search, rerank")
    p.add_argument("--arch", default="qwen2.5-vl", choices=ARCHES)
    p.add_argument("--cache-dir", default="~/.cache/rematch_fast", help="where the tiny checkpoint is kept")
    p.add_argument("--out", default="demo_out", help="folder for the demo corpus and results")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process's own output: keep only our progress bars
    warnings.simplefilter("ignore", TruncationWarning)  # reported per row instead, with its line
    if getattr(args, "batch_size", 1) < 1:
        _log("error: --batch-size must be >= 1")
        return EXIT_USAGE
    try:
        return args.func(args)
    except ReMatchError as e:
        _log(f"error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
