"""Embedding a Ray Data dataset into a sharded store, on every GPU of a Ray cluster.

`embed_dataset(dataset, checkpoint, out)` runs `dataset.map_batches` with one Ray actor per GPU
(or `concurrency` CPU actors); each actor loads the model once and embeds its batches with the
pipeline `rematch-fast embed` runs (`rematch_fast.pipeline.embed_rows`). The driver takes the
results back in dataset order (Ray's `preserve_order`) and writes the same store that
`rematch-fast embed` writes (format 2, `rematch_fast.shards`): shards of `shard_rows` rows, the
rejects with their reasons in `rejects.jsonl`, the manifest last.

Needs Ray Data: `pip install 'rematch-fast[distributed]'`.

Rows: `id` (a non-empty string or an integer), and `text` and/or `image` (a path string); other
columns are not read. A row that cannot be used (no id, an empty text and no image, an image that
cannot be read, an id seen before in the dataset: the first is kept) goes to `rejects.jsonl` with
its reason; it never stops the job. A reject's `line` is the row's 1-based position in the
dataset's order, and its `row` is the row as JSON. Image paths are read by the actors, so every
node must see them at the same path (a shared file system): a relative path is taken relative to
the driver's working directory, or, with `image_root=DIR`, must lie inside DIR (as
`rematch-fast embed --image-root`).

The store is the dataset's rows in the dataset's order. Shards are cut as `rematch-fast embed`
cuts them: every `shard_rows` usable rows (rows rejected while being embedded still count toward
their shard, as there). Each row's embedding is the one `embed_rows` gives for the Ray batch it
was embedded in; float32 batched matrix products can round differently in the last bit when rows
are grouped differently, so a row's values may differ from a `rematch-fast embed` run (whose
groups are its shards) by about 1e-7, as they do between two CLI runs with another --shard-rows.

What stays on the driver: one shard's embeddings, the set of ids seen (to find duplicates) and the
rejects; the dataset itself is never materialized. Only the driver writes: `out` must be on the
driver's file system; the checkpoint must be at the same path on every node (each actor checks
that its copy has the driver's fingerprint). A run that fails leaves an incomplete store (no
manifest.json): run it again with overwrite=True (there is no resume here).

Several machines:

    # on the head node
    ray start --head --port=6379
    # on every other node (rematch-fast installed, checkpoint and images at the same paths)
    ray start --address=HEAD_IP:6379

    # driver.py, run on the head node (or anywhere that can reach it)
    import ray
    from rematch_fast.distributed import embed_dataset

    ray.init(address="auto")
    ds = ray.data.read_parquet("/shared/corpus/")       # or ray.data.read_json("/shared/corpus.jsonl")
    summary = embed_dataset(ds, "/shared/ckpt", "/shared/index", backend="fast", dtype="bfloat16",
                            store_dtype="float16")    # one actor per GPU of the cluster
    print(summary.rows, "rows,", summary.shards, "shards,", len(summary.rejects), "rejected")

The store is then searched as any other: `rematch-fast search CKPT queries.jsonl --index /shared/index`.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np

from . import corpus
from .config import DEFAULT_DECODE_LIMIT, DEFAULT_SHARD_ROWS, EMBED_BATCH_SIZE, check_side
from .errors import InputError, ReMatchError, TruncationWarning
from .jsonl import Reject, Row

COLUMNS = ("id", "text", "image")  # the columns read; any other is left alone
ROWS_PER_CALL = 1024  # most rows one actor call embeds (Ray's batch), unless shard_rows is smaller
_GOOD, _ROW_REJECT, _EMBED_REJECT = 0, 1, 2  # a row's fate, as an actor reports it


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("embedding a Ray dataset needs Ray Data: pip install 'rematch-fast[distributed]'") from None
    return ray


# -- on the actors ---------------------------------------------------------------------
class _Counter:
    """embed_rows's bar, in an actor: counts the tokens embedded."""

    def __init__(self):
        self.tokens = 0

    def update(self, n: int) -> None:
        pass

    def add_tokens(self, n: int) -> None:
        self.tokens += n


def batch_lines(batch):
    """(position from 1, raw JSON, row dict or BadLine) for each row of a pyarrow Table, its
    strings decoded strictly as in a Parquet corpus (rematch_fast.sources)."""
    import pyarrow as pa

    from .jsonl import BadLine
    from .sources import _Bad, _raw, _values

    names = [c for c in COLUMNS if c in batch.column_names]
    values = [_values(batch.column(c), c, pa) for c in names]
    for n, row in enumerate(zip(*values) if names else ([] for _ in range(batch.num_rows)), start=1):
        obj = dict(zip(names, row))
        raw = _raw(obj)
        bad = next((v for v in row if isinstance(v, _Bad)), None)
        yield n, raw, (BadLine(bad.reason, raw) if bad else obj)


def embed_batch(model, batch, side: str, batch_size: int, base: str, image_root: str | None) -> dict:
    """One Ray batch (a pyarrow Table), embedded: one output row per input row, in order, with
    `id` (the id as JSON, "null" when it is unusable), `fate` (0: embedded, 1: the row itself is
    bad, 2: rejected while being embedded), `reason`, `raw` (the row as JSON), `unit` [n, dim]
    and `norm` [n] float32 (zeros for rejects), and in the first row `tokens` and `truncated`
    (the batch's totals)."""
    from .jsonl import _rows
    from .pipeline import embed_rows

    n = batch.num_rows
    out = {"id": np.full(n, "null", dtype=object), "fate": np.full(n, _GOOD, dtype=np.int8),
           "reason": np.full(n, "", dtype=object), "raw": np.full(n, "", dtype=object),
           "unit": np.zeros((n, model.dim), dtype=np.float32), "norm": np.zeros(n, dtype=np.float32),
           "tokens": np.zeros(n, dtype=np.int64), "truncated": np.zeros(n, dtype=np.int64)}
    rows = []
    # within the batch, a repeated id is rejected here; across batches the driver rejects it
    for r in _rows(batch_lines(batch), Path(base), Path(image_root) if image_root else None):
        i = r.line - 1
        out["id"][i], out["raw"][i] = json.dumps(r.id, ensure_ascii=False), r.raw
        if isinstance(r, Reject):
            out["fate"][i], out["reason"][i] = _ROW_REJECT, r.reason
        else:
            rows.append(r)
    counter, cut = _Counter(), []
    ids, emb, rejects = embed_rows(model, rows, side, batch_size, log=cut.append, bar=counter)
    for r in rejects:
        out["fate"][r.line - 1], out["reason"][r.line - 1] = _EMBED_REJECT, r.reason
    kept = [r.line - 1 for r in rows if out["fate"][r.line - 1] == _GOOD]
    if len(kept) != len(ids):
        raise ReMatchError(f"embed_rows returned {len(ids)} embeddings for {len(kept)} rows")
    if kept:
        out["unit"][kept] = emb.unit.numpy()
        out["norm"][kept] = emb.norm.numpy()
    if n:
        out["tokens"][0], out["truncated"][0] = counter.tokens, len(cut)
    return out


class Embedder:
    """The map_batches actor: loads the model once, then embeds one batch per call."""

    def __init__(self, model_spec: dict, fingerprint: str, side: str, batch_size: int, base: str,
                 image_root: str | None):
        from .api import ReMatch

        warnings.simplefilter("ignore", TruncationWarning)  # counted, and reported once by the driver
        self.model = ReMatch.from_pretrained(**model_spec)
        if self.model.checkpoint.fingerprint != fingerprint:
            raise ReMatchError(f"the checkpoint at {model_spec['path']} on this node has fingerprint "
                               f"{self.model.checkpoint.fingerprint}, the driver's has {fingerprint}: "
                               "every node needs the same checkpoint")
        self.args = (side, batch_size, base, image_root)

    def __call__(self, batch) -> dict:
        return embed_batch(self.model, batch, *self.args)


# -- on the driver ---------------------------------------------------------------------
def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_out(out: Path, overwrite: bool) -> None:
    """As `rematch-fast embed`: an existing folder is replaced only with overwrite=True."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} is a file; a folder is needed here")
    if {p.name for p in out.iterdir()} <= {corpus.REJECTS}:
        return
    if not overwrite:
        raise InputError(f"{out} exists; pass overwrite=True to replace it")


def _stream(batches, found: dict, state: dict):
    """The dataset's rows as the corpus job reads a source: a Row for each row whose id is usable
    and new (its embedding or embed-time reason goes to `found`, by line), a Reject for the rest."""
    seen = set()
    line = 0
    for b in batches:
        state["tokens"] += int(b["tokens"].sum())
        state["truncated"] += int(b["truncated"].sum())
        state["bar"].update(len(b["fate"]))
        state["bar"].add_tokens(int(b["tokens"].sum()))
        # copied out of the batch (which may be a view of Ray's object store, kept pinned while a
        # view of it lives): the shard in progress holds rows of many batches
        unit, norm = np.array(b["unit"], dtype=np.float32), np.array(b["norm"], dtype=np.float32)
        for i in range(len(b["fate"])):
            line += 1
            rid, fate, raw = json.loads(b["id"][i]), int(b["fate"][i]), str(b["raw"][i])
            if fate == _ROW_REJECT:
                yield Reject(line, rid, str(b["reason"][i]), raw)
                continue
            if rid in seen:
                yield Reject(line, rid, f"duplicate id {rid!r}", raw)
                continue
            seen.add(rid)
            found[line] = (unit[i], norm[i]) if fate == _GOOD else str(b["reason"][i])
            yield Row(line, rid, None, raw)


def embed_dataset(dataset, checkpoint: str | Path, out: str | Path, *, side: str = "document",
                  store_dtype: str = "float32", shard_rows: int = DEFAULT_SHARD_ROWS,
                  batch_size: int = EMBED_BATCH_SIZE, rows_per_call: int | None = None,
                  concurrency: int | tuple | None = None, num_gpus: float | None = None, device: str | None = None,
                  backend: str = "reference", dtype: str = "float32",
                  max_image_pixels: int | None = DEFAULT_DECODE_LIMIT, backend_options: dict | None = None,
                  image_root: str | Path | None = None, corpus_name: str | None = None, overwrite: bool = False,
                  progress: bool = True, **ray_remote_args) -> corpus.Summary:
    """Embed a `ray.data.Dataset` of {id, text and/or image} rows into the store `out` (see the
    module docstring); returns a `rematch_fast.corpus.Summary` (rows, shards, rejects, tokens,
    seconds).

    side, store_dtype, shard_rows, batch_size (most sequences per forward pass), backend, dtype,
    max_image_pixels: as `rematch-fast embed`; backend_options go to `ReMatch.from_pretrained`
    (e.g. {"quantize": "int8"} or {"kernels": "torch"}). The defaults are the CLI's, so the same
    settings make the same kind of store.
    rows_per_call: rows per actor call (Ray's batch_size; default min(shard_rows, 1024)).
    num_gpus: GPUs per actor (default: 1 when the cluster has GPUs, else 0); device: the actors'
    torch device (default: "cuda" with GPUs, else "cpu"); concurrency: actors (default: one per
    GPU of the cluster, or 1 on CPUs; an int, or (min, max) for an autoscaling pool).
    ray_remote_args (num_cpus, memory, accelerator_type, ...) go to `map_batches`: a CPU actor's
    torch uses as many threads as its num_cpus.
    corpus_name: what job.json records as the corpus (default "ray.data:NAME" for a dataset named
    with `set_name`, else "ray.data").
    """
    ray = _ray()
    from .checkpoint import open_checkpoint
    from .shards import store_dtype as parse_store_dtype

    if not isinstance(dataset, ray.data.Dataset):
        raise InputError(f"dataset must be a ray.data.Dataset, got {type(dataset).__name__}")
    check_side(side)
    parse_store_dtype(store_dtype)
    _positive(shard_rows, "shard_rows")
    _positive(batch_size, "batch_size")
    rows_per_call = _positive(rows_per_call, "rows_per_call") if rows_per_call is not None \
        else min(shard_rows, ROWS_PER_CALL)
    out = Path(out)
    _check_out(out, overwrite)
    if image_root is not None:
        if not Path(image_root).is_dir():
            raise InputError(f"the image root {image_root} is not a directory")
        image_root = str(Path(image_root).resolve())
    schema = dataset.schema(fetch_if_missing=False)
    if schema is not None and "id" not in schema.names:
        raise InputError(f"the dataset has no 'id' column; its columns are: {', '.join(schema.names) or 'none'}")

    path = Path(checkpoint).resolve()
    ckpt = open_checkpoint(path)
    if not ray.is_initialized():
        ray.init()
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    device = device or ("cuda" if num_gpus else "cpu")
    device_type = str(device).split(":")[0]
    if device_type == "cuda" and not num_gpus:
        raise InputError(f"device {device!r} needs GPUs: pass num_gpus (per actor) or leave device out")
    if concurrency is None:
        gpus = ray.cluster_resources().get("GPU", 0)
        concurrency = max(1, int(gpus // num_gpus)) if num_gpus else 1
    model_spec = {"path": str(path), "backend": backend, "device": device, "dtype": dtype,
                  "max_image_pixels": max_image_pixels or None, **(backend_options or {})}
    name = getattr(dataset, "name", None)
    job = corpus.Job(checkpoint=str(path), fingerprint=ckpt.fingerprint, side=side, dim=ckpt.config.hidden_size,
                     dtype=store_dtype, shard_rows=shard_rows,
                     model={**model_spec, "path": None, "device": device_type}, batch_size=batch_size,
                     corpus=corpus_name or (f"ray.data:{name}" if name else "ray.data"), image_root=image_root)

    mapped = dataset.map_batches(
        Embedder, batch_size=rows_per_call, batch_format="pyarrow", concurrency=concurrency, num_gpus=num_gpus,
        fn_constructor_kwargs={"model_spec": model_spec, "fingerprint": ckpt.fingerprint, "side": side,
                               "batch_size": batch_size, "base": str(Path.cwd()), "image_root": image_root},
        **ray_remote_args)
    # the context a dataset was made with is its own (DataContext.get_current() no longer reaches
    # it): set there for this run, and restored after
    ctx = getattr(mapped, "context", None) or ray.data.DataContext.get_current()
    options = ctx.execution_options
    saved = (options.preserve_order, ctx.enable_progress_bars)
    options.preserve_order, ctx.enable_progress_bars = True, saved[1] and progress
    begun = time.perf_counter()
    summary, entries, found = corpus.Summary(), [], {}
    try:
        corpus.prepare_folder(out, job, resume=False, overwrite=True)  # job.json first, as the CLI
        with corpus.Progress(None, disable=not progress) as bar:
            state = {"tokens": 0, "truncated": 0, "bar": bar}
            batches = mapped.iter_batches(batch_size=None, batch_format="numpy")
            for task in corpus.plan_tasks(_stream(batches, found, state), shard_rows):
                summary.rejects += task.rejects
                bar.add_rejects(len(task.rejects), counted=True)
                if not task.rows:  # the dataset's last rows were all bad: no shard
                    continue
                ids, units, norms, more = [], [], [], []
                for r in task.rows:
                    got = found.pop(r.line)
                    if isinstance(got, str):
                        more.append(Reject(r.line, r.id, got, r.raw))
                        continue
                    ids.append(r.id)
                    units.append(got[0])
                    norms.append(got[1])
                emb = _embeddings(units, norms, job.dim)
                entries.append(corpus.save_shard(out, job, task.number, ids, emb, task.rejects + more, task.digest()))
                summary.rejects += more
                bar.add_rejects(len(more), counted=True)
    finally:
        options.preserve_order, ctx.enable_progress_bars = saved
    summary.rejects.sort(key=lambda r: r.line)
    summary.shards = len(entries)
    summary.rows = sum(e["rows"] for e in entries)
    summary.tokens = state["tokens"]
    summary.seconds = time.perf_counter() - begun
    corpus.finish_store(out, job, entries, summary.rejects, out / corpus.REJECTS)
    if state["truncated"]:
        warnings.warn(f"{state['truncated']} texts were cut to max_text_tokens={ckpt.config.max_text_tokens}",
                      TruncationWarning, stacklevel=2)
    return summary


def _embeddings(units: list, norms: list, dim: int):
    import torch

    from .embeddings import Embeddings

    if not units:
        return Embeddings(torch.empty(0, dim), torch.empty(0))
    return Embeddings(torch.from_numpy(np.stack(units)), torch.from_numpy(np.asarray(norms, dtype=np.float32)))
