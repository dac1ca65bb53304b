"""The `rematch-fast` command line: init-tiny, embed, search, rerank, export, export-faiss, quantize, parity, demo.

Exit status:
  0  done
  1  error: no output was written (when rows were rejected, the rejects file says why)
  2  bad command line: a bad value, an unknown backend or device; checked before any work
  3  done, but some rows were rejected (listed with their reasons in the rejects file)
An input with no usable row (empty, or every row rejected) is an error (1). The rejects file
is always written (replaced on every run, empty when nothing was rejected, never one of the
run's inputs or outputs). No output or checkpoint is replaced unless --overwrite is given
(`demo` rewrites its own --out folder on every run). Interrupted (Ctrl-C): 130.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .backends import registered_backends
from .config import (ARCHES, DEFAULT_DECODE_LIMIT, DEFAULT_SHARD_ROWS, EMBED_BATCH_SIZE, INDEX_DTYPES,
                     MATCH_BATCH_SIZE, MODEL_DTYPES, QUANTIZE_PRESETS)
from .errors import InputError, ReMatchError, TruncationWarning

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTS = 0, 1, 2, 3
RERANK_CHUNK = 64  # queries scored together by rerank (one token budget); bounds the items held at once


class UsageError(Exception):
    """A bad command-line value (exit 2)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_model(args):
    from .api import ReMatch

    options = {"quantize": args.quantize} if args.quantize else {}  # a fast-backend option
    return ReMatch.from_pretrained(args.checkpoint, backend=args.backend, device=args.device, dtype=args.dtype,
                                   max_image_pixels=args.max_image_pixels or None, **options)


# -- outputs: checked before any work, never replaced without --overwrite ------------------
def _writable_dir(folder: Path) -> None:
    """The nearest existing folder at or above `folder` accepts new files."""
    at = folder
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        raise InputError(f"{folder} cannot be created: {at} is a file")
    if not os.access(at, os.W_OK | os.X_OK):
        raise InputError(f"{at} is not writable")


def _check_output(path: Path, kind: str, overwrite: bool) -> None:
    """`path` may be written as a `kind` ("file" or "folder")."""
    if path.exists():
        if (kind == "file") != path.is_file():
            raise InputError(f"{path} is a {'folder' if path.is_dir() else 'file'}; a {kind} is needed here")
        if kind == "folder" and {p.name for p in path.iterdir()} <= {"rejects.jsonl"}:
            return  # empty, or only the rejects of a run that wrote nothing: nothing to lose
        if not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace it")
    _writable_dir(path.parent if kind == "file" else path)


def _rejects_path(args, default: Path, out: Path) -> Path:
    """Where this run's rejects go (replaced on every run: they describe the last run). Never one of
    the run's inputs or its output: a typo there must not overwrite a corpus or the results."""
    path = Path(args.rejects) if args.rejects else default
    others = [out] + [Path(v) for k in ("corpus", "queries", "hits") if (v := getattr(args, k, None))]
    if any(path.resolve() == o.resolve() for o in others):
        raise InputError(f"--rejects {path} is also an input or the output of this run; choose another file")
    _check_output(path, "file", overwrite=True)
    return path


def _file_outputs(args) -> tuple[Path, Path]:
    """--out (a file, replaced only with --overwrite) and its rejects file, checked before any work."""
    out = Path(args.out)
    _check_output(out, "file", args.overwrite)
    return out, _rejects_path(args, Path(str(out) + ".rejects.jsonl"), out)


def _finish(rejects, rejects_path: Path, what: str, done: bool) -> int:
    """Write the rejects file (always: empty when nothing was rejected) and pick the exit status."""
    from .jsonl import write_jsonl

    rejects = sorted(rejects, key=lambda r: r.line)
    rejects_path.parent.mkdir(parents=True, exist_ok=True)  # checked writable before the work
    write_jsonl(rejects_path, [r.to_json() for r in rejects])
    if rejects:
        _log(f"{len(rejects)} {what} rejected; reasons in {rejects_path}")
    if not done:
        return EXIT_ERROR
    return EXIT_REJECTS if rejects else EXIT_OK


def _nothing_usable(source, rejects, rejects_path: Path, what: str) -> int:
    _log(f"error: no {what} of {source} could be used ({len(rejects)} rejected); nothing written")
    return _finish(rejects, rejects_path, what, done=False)


def _index_store(folder, checkpoint, allow_mismatch: bool):
    """The embedding store an index or a feature view reads (memory-mapped: read where it lies),
    refused when another checkpoint or the query side wrote it (unless --allow-index-mismatch)."""
    from .checkpoint import open_checkpoint
    from .shards import ShardedStore

    store = ShardedStore.open(folder)
    fingerprint = open_checkpoint(checkpoint).fingerprint
    problems = []
    if store.side != "document":
        problems.append(f"it holds {store.side!r} embeddings, not 'document' ones")
    if not store.fingerprint:
        problems.append("it records no checkpoint fingerprint (written by an older rematch_fast)")
    elif store.fingerprint != fingerprint:
        problems.append(f"another checkpoint wrote it ({store.checkpoint or 'unknown path'})")
    if problems and not allow_mismatch:
        raise InputError(f"{folder} cannot be searched with {checkpoint}: " + "; ".join(problems)
                         + " (pass --allow-index-mismatch to use it anyway)")
    for problem in problems:
        _log(f"warning: {folder}: {problem}; used anyway (--allow-index-mismatch)")
    return store


# -- commands ----------------------------------------------------------------
def cmd_init_tiny(args) -> int:
    from .folders import staged_folder
    from .tiny import make_tiny_checkpoint

    out = Path(args.dir)
    _check_output(out, "folder", args.overwrite)
    # built beside, then swapped in: a failed build leaves the old checkpoint as it was
    with staged_folder(out, "rematch_config.json", args.overwrite, "a rematch_fast checkpoint folder") as staging:
        make_tiny_checkpoint(staging, arch=args.arch, seed=args.seed, **args.sizes)
    print(f"tiny {args.arch} checkpoint (random weights, seed {args.seed}) written to {out}")
    return EXIT_OK


def cmd_export(args) -> int:
    import contextlib
    import io
    import logging

    from .export.exporter import export_onnx

    if args.format == "tensorrt":
        from .export.tensorrt import build_engines, parse_profile

        engines = build_engines(args.checkpoint, args.precision or "fp16", parse_profile(args.profile),
                                args.cache_dir, log=None if args.quiet else _log)
        print(f"TensorRT engines: {', '.join(str(e) for e in engines.values())}")
        return EXIT_OK
    _check_output(Path(args.out), "folder", args.overwrite)
    # torch's exporter reports each step on stdout and warns about optional packages: not ours to show
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    items = _corpus_items(args.corpus) if args.parity else None  # a bad corpus fails before the export
    calibration = _corpus_texts(args.calibration) if args.calibration else None
    with contextlib.redirect_stdout(sys.stderr if not args.quiet else io.StringIO()):
        out = export_onnx(args.checkpoint, args.out, args.precision or "fp32", args.overwrite,
                          progress=None if args.quiet else _log, quantize=args.quantize, calibration=calibration)
    graphs = ", ".join(g["file"] for g in json.loads((out / "export.json").read_text())["graphs"].values())
    print(f"exported {args.checkpoint} to {out} ({graphs}; open it with backend='onnx')")
    if not args.parity:
        return EXIT_OK
    return _parity(args.checkpoint, out, items, out / "parity.json")


def cmd_quantize(args) -> int:
    from .quantized_checkpoint import quantize_checkpoint

    _check_output(Path(args.out), "folder", args.overwrite)
    import torch

    out = quantize_checkpoint(args.checkpoint, args.out, args.preset, getattr(torch, args.dtype), args.overwrite)
    print(f"quantized {args.checkpoint} ({args.preset}) to {out}; open it with backend='fast'")
    return EXIT_OK


def cmd_parity(args) -> int:
    report_path = Path(args.out) if args.out else Path(args.candidate) / "parity.json"
    _check_output(report_path, "file", overwrite=True)
    return _parity(args.reference, Path(args.candidate), _corpus_items(args.corpus), report_path)


def _corpus_items(corpus) -> list | None:
    """The items of a JSONL corpus's good rows (images included), for parity."""
    if corpus is None:
        return None
    from .jsonl import read_rows

    rows, _ = read_rows(corpus)
    if len(rows) < 2:
        raise InputError(f"{corpus} has {len(rows)} usable rows; at least 2 are needed")
    return [r.item for r in rows]


def _corpus_texts(corpus) -> list[str]:
    """The texts of a JSONL corpus's rows, for calibration (rows with images are left out: the
    int8 presets quantize the decoder's graphs, calibrated on text)."""
    texts = [item.text for item in _corpus_items(corpus) if item.image is None and item.text]
    if len(texts) < 2:
        raise InputError(f"{corpus} has {len(texts)} usable text rows; at least 2 are needed")
    return texts


def _parity(reference, candidate: Path, items, report_path: Path) -> int:
    """Compare an export with its reference checkpoint; the report is saved either way."""
    from .api import ReMatch
    from .export.parity import compare
    from .jsonl import set_user_mode

    manifest = candidate / "export.json"
    precision = json.loads(manifest.read_text()).get("precision", "fp32") if manifest.is_file() else "fp32"
    report = compare(ReMatch.from_pretrained(reference), ReMatch.from_pretrained(candidate, backend="onnx"),
                     items, precision)
    report.save(report_path)
    set_user_mode(report_path)
    print(report.summary() + f" Report: {report_path}")
    return EXIT_OK if report else EXIT_ERROR


def cmd_embed(args) -> int:
    from . import corpus
    from .checkpoint import open_checkpoint
    from .sources import iter_source

    out = Path(args.out)
    if not args.resume:
        _check_output(out, "folder", args.overwrite)
    rejects_path = _rejects_path(args, out / corpus.REJECTS, out)
    ckpt = open_checkpoint(args.checkpoint)
    devices = _worker_devices(args)
    model = {"path": args.checkpoint, "backend": args.backend, "device": args.device, "dtype": args.dtype,
             "max_image_pixels": args.max_image_pixels or None}
    if args.quantize:
        model["quantize"] = args.quantize
    job = corpus.Job(checkpoint=str(Path(args.checkpoint).resolve()), fingerprint=ckpt.fingerprint, side=args.side,
                     dim=ckpt.config.hidden_size, dtype=args.store_dtype, shard_rows=args.shard_rows,
                     model={**model, "path": None, "device": _device_type(devices or [args.device])},
                     batch_size=args.batch_size or EMBED_BATCH_SIZE, corpus=str(Path(args.corpus).resolve()),
                     image_root=args.image_root and str(Path(args.image_root).resolve()),
                     captions=args.captions and str(Path(args.captions).resolve()))
    source = iter_source(args.corpus, image_root=args.image_root, captions=args.captions)
    summary = corpus.run(job, source, out, model, workers=devices, resume=args.resume, overwrite=args.overwrite,
                         total=corpus.expected_rows(args.corpus), progress=not args.quiet, log=_log,
                         rejects_path=rejects_path)
    if not summary.rows:
        return _nothing_usable(args.corpus, summary.rejects, rejects_path, "rows")
    kept = f", {summary.resumed_shards} of them kept from the interrupted run" if summary.resumed_shards else ""
    print(f"embedded {summary.rows} rows ({args.side}) into {out}: {summary.shards} shards{kept}, "
          f"{len(summary.rejects)} rejected, {summary.seconds:.1f} s "
          f"({summary.rows / max(summary.seconds, 1e-9):,.1f} rows/s)")
    return _finish(summary.rejects, rejects_path, "rows", done=True)


def _worker_devices(args) -> list[str] | None:
    """One device per worker process, or None: embed in this process."""
    if args.devices:
        import torch

        if args.devices == "auto":
            n = torch.cuda.device_count()
            return [f"cuda:{i}" for i in range(n)] if n > 1 else None
        return args.devices.split(",")
    return [args.device] * args.workers if args.workers > 1 else None


def _device_type(devices: list[str]) -> str:
    """What a store records of the devices: their type (outputs agree across devices of one type)."""
    return ",".join(sorted({d.split(":")[0] for d in devices}))


def cmd_search(args) -> int:
    from .index import Index
    from .jsonl import read_rows, write_jsonl
    from .pipeline import embed_rows

    out, rejects_path = _file_outputs(args)
    store = _index_store(args.index, args.checkpoint, args.allow_index_mismatch)
    index = Index.from_store(store, device=args.device, dtype=args.index_dtype)
    if index.mode == "streamed" and index.device.type == "cuda" and not args.quiet:
        _log(f"the index ({len(index)} vectors) does not fit {index.device}'s free memory: it stays on the host "
             f"and each search streams it in shards of {index.shard_rows} rows")
    rows, rejects = read_rows(args.queries, image_root=args.image_root)
    model = _load_model(args)
    qids, q, more = embed_rows(model, rows, "query", args.batch_size or EMBED_BATCH_SIZE, not args.quiet, _log)
    rejects += more
    if not qids:
        return _nothing_usable(args.queries, rejects, rejects_path, "queries")
    if q.dim != index.dim:
        raise InputError(f"{args.index} holds {index.dim}-dimensional embeddings; {args.checkpoint} makes {q.dim}")
    k = min(args.k, len(index))
    if k < args.k:
        _log(f"the index holds {len(index)} vectors: returning top {k}, not {args.k}")
    scores, hit_rows = index.search(q.unit, k)
    records = [{"query_id": qid, "hits": [{"id": i, "score": round(v, 6)} for v, i in zip(s, ids)]}
               for qid, s, ids in zip(qids, scores.tolist(), index.ids_of(hit_rows))]
    write_jsonl(out, records)
    print(f"searched {len(records)} queries, top {k}, into {out}")
    return _finish(rejects, rejects_path, "queries", done=True)


def cmd_export_faiss(args) -> int:
    from .faiss_io import ids_path, import_faiss, plan, save_faiss
    from .shards import ShardedStore

    ivf_only = [o for o, v in (("--nlist", args.nlist), ("--m", args.m)) if v is not None]
    if args.type == "flat" and ivf_only:
        return _usage_error(args, f"{', '.join(ivf_only)}: options of --type ivf-pq, not flat")
    for option, value in (("--nlist", args.nlist), ("--m", args.m)):
        if value is not None and value < 1:
            return _usage_error(args, f"{option} must be >= 1, got {value}")
    out = Path(args.out)
    _check_output(out, "file", args.overwrite)
    _check_output(ids_path(out), "file", overwrite=True)  # goes with --out: replaced with it
    import_faiss()  # not installed: said before the store is read
    store = ShardedStore.open(args.store)
    try:  # the values that depend on the store (--m must divide its dimension), before any work
        plan(args.type, len(store), store.dim, nlist=args.nlist, m=args.m)
    except InputError as e:
        return _usage_error(args, str(e))
    meta = save_faiss(store, out, args.type, nlist=args.nlist, m=args.m, overwrite=args.overwrite,
                      progress=not args.quiet)
    detail = "" if args.type == "flat" else f", nlist {meta['nlist']}, m {meta['m']}, nprobe {meta['nprobe']}"
    print(f"exported {meta['count']} vectors (dimension {meta['dim']}) of {args.store} to {out} "
          f"({args.type}{detail}); ids in {ids_path(out)}")
    return EXIT_OK


def _usage_error(args, message: str) -> int:
    _log(f"rematch-fast {args.command}: error: {message}")
    return EXIT_USAGE


def cmd_rerank(args) -> int:
    from .jsonl import Reject, read_rows, write_jsonl

    out, rejects_path = _file_outputs(args)
    queries, query_rejects = read_rows(args.queries, image_root=args.image_root)
    query_by_id = {r.id: r for r in queries}
    bad_query = {r.id: r.reason for r in query_rejects if r.id is not None}  # matters only if a hit row needs it
    docs_by_id, stored = {}, None
    if args.doc_view == "feat" and args.index:
        stored = _index_store(args.index, args.checkpoint, args.allow_index_mismatch)
        stored_row = {d: i for i, d in enumerate(stored.ids)}
    else:
        docs, doc_rejects = read_rows(args.corpus, image_root=args.image_root)
        docs_by_id = {r.id: r for r in docs}
        if doc_rejects:
            _log(f"{len(doc_rejects)} corpus rows are malformed and cannot be candidates")
    hits, rejects = _read_hits(args.hits)
    if not hits:
        return _nothing_usable(args.hits, rejects, rejects_path, "hits rows")
    model = _load_model(args)
    if stored is not None and stored.dim != model.dim:  # once, not once per query
        raise InputError(f"{args.index} holds {stored.dim}-dimensional embeddings; the model's are {model.dim}")
    usable = []  # (line, raw, hits row, query item, candidates) of every row that names what exists
    for line, raw, h in hits:
        try:
            if h["query_id"] in bad_query:
                raise InputError(f"query {h['query_id']!r} is unusable: {bad_query[h['query_id']]}")
            if h["query_id"] not in query_by_id:
                raise InputError(f"query id {h['query_id']!r} is not in {args.queries}")
            cand_ids = [c["id"] for c in h["hits"]]
            known = stored_row if stored is not None else docs_by_id
            missing = [c for c in cand_ids if c not in known]
            if missing:
                raise InputError(f"candidate ids {missing} are not in the corpus")
            candidates = stored.rows([stored_row[c] for c in cand_ids]) if stored is not None else \
                [docs_by_id[c].item for c in cand_ids]
        except InputError as e:
            rejects.append(Reject(line, h["query_id"], str(e), raw))
            continue
        usable.append((line, raw, h, query_by_id[h["query_id"]].item, candidates))
    scored = {}  # line -> p(yes) of its candidates
    batch = args.batch_size or MATCH_BATCH_SIZE
    with tqdm(total=len(usable), desc="rerank", unit="query", disable=args.quiet) as bar:
        for start in range(0, len(usable), RERANK_CHUNK):  # queries of a chunk share one token budget
            chunk = usable[start: start + RERANK_CHUNK]
            try:
                results = model.score_many([(q, c) for *_, q, c in chunk], args.query_view, args.doc_view, batch)
                scored.update((row[0], r.p_yes) for row, r in zip(chunk, results))
            except InputError:  # some row of the chunk is bad: score its rows one by one to name it
                for line, raw, h, q, c in chunk:
                    try:
                        scored[line] = model.match(q, c, args.query_view, args.doc_view, batch)
                    except InputError as e:
                        rejects.append(Reject(line, h["query_id"], str(e), raw))
            bar.update(len(chunk))
    records = []
    for line, _, h, _, _ in usable:
        if line in scored:
            ranked = sorted(({**c, "p_yes": round(float(v), 6)} for c, v in zip(h["hits"], scored[line].tolist())),
                            key=lambda c: -c["p_yes"])
            records.append({"query_id": h["query_id"], "hits": ranked})
    rejects.sort(key=lambda r: r.line)
    if not records:
        return _nothing_usable(args.hits, rejects, rejects_path, "hits rows")
    write_jsonl(out, records)
    print(f"reranked {len(records)} queries into {out}")
    return _finish(rejects, rejects_path, "queries", done=True)


def _read_hits(path):
    from .jsonl import Reject, id_problem, json_lines

    good, bad = [], []
    for n, line, h in json_lines(path, "hits file"):
        try:
            if isinstance(h, Exception):  # a line that is not JSON (or not UTF-8)
                raise InputError(str(h))
            if not isinstance(h, dict) or "query_id" not in h or not isinstance(h.get("hits"), list):
                raise InputError("a hits row needs 'query_id' and a list 'hits'")
            if not all(isinstance(c, dict) and "id" in c for c in h["hits"]):
                raise InputError("every hit needs an 'id'")
            for what, value in [("query_id", h["query_id"])] + [("hit id", c["id"]) for c in h["hits"]]:
                if problem := id_problem(value):
                    raise InputError(f"{what} is {problem}; an id is a non-empty string or an integer")
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
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(MODEL_DTYPES), help="model dtype (default: float32)")
    p.add_argument("--quantize", choices=list(QUANTIZE_PRESETS),
                   help="weight format of the linear layers, with --backend fast: bf16 (the model dtype, the "
                        "default), int8-weight (int8 weights, one scale per output channel), fp8 (e4m3 weights "
                        "and per-token activations; fast on compute capability 8.9+), bnb-int8 or bnb-nf4 "
                        "(bitsandbytes' LLM.int8 and 4-bit NormalFloat; pip install 'rematch-fast[bnb]')")
    p.add_argument("--batch-size", type=int, help=f"most sequences per forward pass (default: {EMBED_BATCH_SIZE} when "
                                                  f"embedding, {MATCH_BATCH_SIZE} when matching; the token budget "
                                                  "binds first for long inputs)")
    p.add_argument("--image-root", help="confine image paths to this folder (for untrusted corpora): relative "
                                        "paths resolve against it and a path that leaves it is rejected "
                                        "(default: paths relative to the JSONL file, any path allowed)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_DECODE_LIMIT, metavar="N",
                   help="largest image file (width x height, from its header) decoded at all; a larger one is "
                        f"rejected before decoding; 0: no limit (default: {DEFAULT_DECODE_LIMIT} = 16384 x 16384)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what}")


def _scoring_options(p: argparse.ArgumentParser, out_help: str) -> None:
    """search and rerank: a JSONL output with its rejects, the index check, the model."""
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--rejects", help="where rejected queries go (default: OUT.rejects.jsonl)")
    _overwrite(p, "output file")
    _model_options(p)
    p.add_argument("--allow-index-mismatch", action="store_true",
                   help="use an index written by another checkpoint, by the query side or by an older rematch_fast "
                        "(refused by default: its scores would mean nothing)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rematch-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write a random-weight tiny checkpoint of a real architecture")
    p.add_argument("dir")
    p.add_argument("--arch", default="qwen2.5-vl", choices=ARCHES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=INT", help="size override, e.g. --set hidden_size=128")
    _overwrite(p, "checkpoint folder")
    p.set_defaults(func=cmd_init_tiny)

    p = sub.add_parser("embed", help="embed a JSONL corpus into an embedding folder")
    p.add_argument("checkpoint")
    p.add_argument("corpus", help="JSONL rows {id, text, image} (image paths relative to the file), a Parquet file "
                                  "with the same columns, or a folder of images (ids: their relative paths)")
    p.add_argument("--out", required=True, help="embedding store (a folder) to write")
    p.add_argument("--side", default="document", choices=["query", "document"])
    p.add_argument("--rejects", help="where rejected rows go (default: OUT/rejects.jsonl)")
    p.add_argument("--captions", help="with a folder of images: JSONL lines {\"image\": RELATIVE_PATH, \"text\": ...} "
                                      "giving an image its text")
    p.add_argument("--store-dtype", default="float32", choices=list(INDEX_DTYPES),
                   help="how the store keeps the unit vectors: float32 (default), float16, bfloat16, or int8 or "
                        "float8_e4m3fn with a scale per row; norms stay float32")
    p.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                   help=f"rows per shard file, the unit of resuming and of work handed to workers "
                        f"(default: {DEFAULT_SHARD_ROWS})")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same --out: complete shards are kept, the rest done; "
                        "refused when the checkpoint, settings or corpus differ")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes on --device, each with its own model (default 1: this process)")
    p.add_argument("--devices", help="one worker process per device: auto (every CUDA device) or a list such as "
                                     "cuda:0,cuda:1 (replaces --device and --workers)")
    _overwrite(p, "embedding store")
    _model_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="embed JSONL queries and find their top-k in an embedding folder")
    p.add_argument("checkpoint")
    p.add_argument("queries")
    p.add_argument("--index", required=True, help="embedding folder written by `embed`")
    p.add_argument("-k", "--k", type=int, default=10, help="hits per query, >= 1 (default: 10)")
    p.add_argument("--index-dtype", choices=sorted(INDEX_DTYPES),
                   help="how the index holds the corpus on --device (int8: per-row quantized; default: the store's "
                        "own dtype, searched without a conversion)")
    _scoring_options(p, "hits JSONL to write")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("rerank", help="score each query's hits with generative matching, p(yes)")
    p.add_argument("checkpoint")
    p.add_argument("--queries", required=True)
    p.add_argument("--hits", required=True, help="hits JSONL from `search` (or any {query_id, hits:[{id}]})")
    p.add_argument("--corpus", help="the corpus JSONL (needed for the raw document view)")
    p.add_argument("--index", help="document embedding folder (used by --doc-view feat)")
    p.add_argument("--query-view", default="raw", choices=["raw", "feat"])
    p.add_argument("--doc-view", default="raw", choices=["raw", "feat"])
    _scoring_options(p, "reranked hits JSONL to write")
    p.set_defaults(func=cmd_rerank)

    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs (backend='onnx'), or build "
                                      "TensorRT engines from such an export")
    p.add_argument("format", choices=["onnx", "tensorrt"])
    p.add_argument("checkpoint", help="onnx: the checkpoint; tensorrt: an export folder written by `export onnx`")
    p.add_argument("--out", help="onnx: the export folder to write (required)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="onnx: fp32 (the default) or fp16 (weights and activations; norms, rotary and softmax "
                        "in fp32); tensorrt: the engines' precision (default fp16; int8 needs an int8-qdq export)")
    p.add_argument("--profile", help="tensorrt: sizes per dynamic axis as AXIS=MIN:OPT:MAX, comma-separated "
                                     "over the defaults (batch=1:8:64,seq=1:256:1024,soft=0:128:16384; vision: "
                                     "patches, frames, frame_patches, windows, window_patches)")
    p.add_argument("--cache-dir", help="tensorrt: where engines and the timing cache go (default: FOLDER/tensorrt)")
    _overwrite(p, "export folder")
    p.add_argument("--quantize", choices=["int8-dynamic", "int8-weight", "int8-qdq"],
                   help="int8 preset: int8-dynamic (ONNX Runtime on the CPU: MatMul weights int8 per channel, "
                        "activations per tensor at run time), int8-weight (ONNX Runtime: weights int8 in blocks "
                        "of 32, activations fp32) or int8-qdq (SmoothQuant, then static symmetric Q/DQ "
                        "calibrated on --calibration texts; the int8 graph TensorRT builds)")
    p.add_argument("--calibration", help="JSONL whose texts int8-qdq calibrates on (default: a small built-in set)")
    p.add_argument("--parity", action="store_true", help="then compare the export with the checkpoint "
                                                          "(OUT/parity.json); a failing export exits 1")
    p.add_argument("--corpus", help="JSONL whose rows (texts and images) --parity compares on "
                                    "(default: a small built-in set of texts and images)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="write a pre-quantized checkpoint (loads without quantizing; backend fast)")
    p.add_argument("checkpoint")
    p.add_argument("--preset", required=True, choices=[q for q in QUANTIZE_PRESETS if q != "bf16"],
                   help="weight format of the linear layers")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of everything but the quantized weights (default: bfloat16)")
    _overwrite(p, "pre-quantized checkpoint")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export-faiss", help="export an embedding store to a FAISS index file (inner product), "
                                            "its ids beside it in OUT.ids.json")
    p.add_argument("store", help="embedding folder written by `embed`")
    p.add_argument("--out", required=True, help="the FAISS index file to write (faiss.read_index reads it)")
    p.add_argument("--type", required=True, choices=["flat", "ivf-pq"],
                   help="flat: IndexFlatIP, exact, 4 * dim bytes a vector; ivf-pq: IndexIVFPQ, "
                        "approximate, M bytes a vector, trained on a fixed sample of up to 100000 rows")
    p.add_argument("--nlist", type=int, help="ivf-pq: inverted lists (default: about 4 * sqrt(rows), at most one "
                                             "per 39 training rows)")
    p.add_argument("--m", type=int, help="ivf-pq: sub-vectors per vector, a divisor of the dimension "
                                         "(default: the divisor nearest dim / 8, sub-vectors of 4 to 16 dimensions)")
    _overwrite(p, "index file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export_faiss)

    p = sub.add_parser("parity", help="compare an export with its reference checkpoint (exit 1 on failure)")
    p.add_argument("--reference", required=True, help="the checkpoint")
    p.add_argument("--candidate", required=True, help="an export folder")
    p.add_argument("--corpus", help="JSONL whose rows (texts and images) are compared "
                                    "(default: a small built-in set of texts and images)")
    p.add_argument("--out", help="report JSON to write (default: CANDIDATE/parity.json)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("demo", help="tiny end-to-end run: build, embed, search, rerank")
    p.add_argument("--arch", default="qwen2.5-vl", choices=ARCHES)
    p.add_argument("--cache-dir", default="~/.cache/rematch_fast", help="where the tiny checkpoint is kept")
    p.add_argument("--out", default="demo_out", help="folder for the demo corpus and results (rewritten on every run)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    return ap


def _quiet_transformers() -> None:
    """This process's output keeps only our progress bars: transformers' own ("Loading weights") are
    off. Imported already (a caller's process): switch them off; otherwise transformers reads the
    setting when first imported, and the command line starts without importing it at all."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def check_usage(args) -> None:
    """Every command-line value that can be judged before any work (UsageError: exit 2)."""
    from .config import parse_device

    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "max_image_pixels", 0) < 0:
        raise UsageError(f"--max-image-pixels must be >= 0 (0: no limit), got {args.max_image_pixels}")
    if args.command == "embed":
        _check_embed_usage(args)
    if getattr(args, "k", 1) < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    if getattr(args, "backend", "reference") not in registered_backends():
        raise UsageError(f"unknown backend {args.backend!r}; registered: {registered_backends()}")
    try:
        parse_device(getattr(args, "device", "cpu"))
    except InputError as e:
        raise UsageError(str(e)) from None
    if args.command == "rerank" and not (args.corpus or (args.index and args.doc_view == "feat")):
        raise UsageError("rerank needs --corpus (or, with --doc-view feat, --index)")
    if args.command == "init-tiny":
        from .tiny import TINY_SIZES, check_sizes

        args.sizes = {}
        for kv in args.set or []:
            key, sep, value = kv.partition("=")
            value = value.strip()
            if not sep or not (value.isascii() and value.isdigit()) or int(value) < 1:
                raise UsageError(f"--set takes KEY=POSITIVE_INTEGER, got {kv!r}")
            if key not in TINY_SIZES:
                raise UsageError(f"--set {key}: not a size; choose from {sorted(TINY_SIZES)}")
            args.sizes[key] = int(value)
        try:
            check_sizes({**TINY_SIZES, **args.sizes})
        except InputError as e:
            raise UsageError(str(e)) from None
    if getattr(args, "image_root", None) and not Path(args.image_root).is_dir():
        raise UsageError(f"--image-root {args.image_root} is not a folder")
    if args.command == "export":
        _check_export_usage(args)


def _check_embed_usage(args) -> None:
    from .config import parse_device

    if args.shard_rows < 1:
        raise UsageError(f"--shard-rows must be >= 1, got {args.shard_rows}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a store and --overwrite replaces it: pass one of them")
    if args.devices and args.workers > 1:
        raise UsageError("--devices gives one worker per device: it goes without --workers")
    if args.devices and args.devices != "auto":
        try:
            for d in args.devices.split(","):
                parse_device(d)
        except InputError as e:
            raise UsageError(f"--devices: {e}") from None
    if args.captions and not Path(args.corpus).is_dir():
        raise UsageError("--captions goes with a folder of images as the corpus")


def _check_export_usage(args) -> None:
    """Which options go with which export format, and the TensorRT profile's syntax."""
    onnx_only = [o for o, v in (("--out", args.out), ("--quantize", args.quantize), ("--parity", args.parity),
                                ("--corpus", args.corpus), ("--calibration", args.calibration)) if v]
    trt_only = [o for o, v in (("--profile", args.profile), ("--cache-dir", args.cache_dir)) if v]
    if args.format == "onnx":
        if not args.out:
            raise UsageError("export onnx needs --out FOLDER")
        if trt_only:
            raise UsageError(f"{', '.join(trt_only)}: options of `export tensorrt`, not `export onnx`")
        if args.calibration and args.quantize != "int8-qdq":
            raise UsageError("--calibration goes with --quantize int8-qdq")
        if args.precision == "int8":
            raise UsageError("export onnx writes fp32 or fp16 graphs; for int8 add --quantize PRESET")
        if args.quantize and args.precision == "fp16":
            raise UsageError("the int8 presets quantize fp32 graphs: --quantize goes without --precision fp16")
    else:
        if onnx_only:
            raise UsageError(f"{', '.join(onnx_only)}: options of `export onnx`, not `export tensorrt`")
        from .export.tensorrt import parse_profile

        try:
            parse_profile(args.profile)
        except InputError as e:
            raise UsageError(str(e)) from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_usage(args)
    except UsageError as e:
        _log(f"rematch-fast {args.command}: error: {e}")
        return EXIT_USAGE
    _quiet_transformers()
    warnings.simplefilter("ignore", TruncationWarning)  # reported per row instead, with its line
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
