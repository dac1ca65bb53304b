"""Embedding a corpus of any size into a sharded store (rematch_fast.shards), resumably, on one or
more workers: what `rematch-fast embed` runs.

The corpus is read lazily (rematch_fast.sources) and cut into tasks of `shard_rows` good rows; the
rows a source rejects (bad JSON, a duplicate id) go with the task whose span they fall in. Each
task is embedded on its own, from its first row, and written as one shard: a shard's bytes depend
only on its rows and the model, so a resumed run, or one spread over several workers, writes the
same shards as one uninterrupted run.

Resume: `job.json` records what makes the store (checkpoint fingerprint, side, dtype, shard size,
model settings, corpus); a resumed run must match it. The corpus is read again from the start;
a task whose shard is already complete is checked against it (the digest of its rows' lines and
ids) and skipped, so at most the shards in progress when the run stopped are done again.

Workers: with `workers > 1` (or several devices) each worker is a process with its own model;
the main process reads the corpus and hands tasks out as workers free up, at most one waiting
per worker, so host memory stays bounded.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import InputError, ReMatchError
from .jsonl import Reject, Row, remove_leftover, write_jsonl
from .shards import (FORMAT, JOB, MANIFEST, encode, file_sha256, read_header, shard_name,
                     shard_number, store_dtype, write_json, write_shard)

REJECTS = "rejects.jsonl"
_FORMAT1_FILES = ("embeddings.safetensors", "ids.json")  # a format-1 store an overwrite replaces


@dataclass
class Task:
    """The rows of one shard, and the source's rejects in its span of the corpus."""

    number: int
    rows: list[Row]
    rejects: list[Reject]

    def digest(self) -> str:
        """What the task covers (lines and ids): a resumed run checks its shards still match."""
        span = [[r.line, r.id] for r in self.rows] + [[r.line] for r in self.rejects]
        return hashlib.sha256(json.dumps(span, ensure_ascii=False).encode("utf-8")).hexdigest()


def plan_tasks(source, shard_rows: int):
    """Tasks of `shard_rows` good rows each, in corpus order. A last task may hold only rejects
    (the corpus ends with bad rows): it makes no shard."""
    rows, rejects, number = [], [], 0
    for x in source:
        if isinstance(x, Reject):
            rejects.append(x)
            continue
        rows.append(x)
        if len(rows) == shard_rows:
            yield Task(number, rows, rejects)
            rows, rejects, number = [], [], number + 1
    if rows or rejects:
        yield Task(number, rows, rejects)


@dataclass
class Job:
    """What makes a store, recorded in job.json: a resumed run must be the same job."""

    checkpoint: str  # resolved path (shown; not compared: a moved checkpoint is the same one)
    fingerprint: str
    side: str
    dim: int
    dtype: str  # the store's
    shard_rows: int
    model: dict  # from_pretrained's settings: backend, device type, dtype, quantize, image limit
    batch_size: int
    corpus: str  # resolved path
    image_root: str | None = None
    captions: str | None = None
    format: str = FORMAT

    def differences(self, other: dict) -> list[str]:
        mine = asdict(self)
        return [k for k in mine if k != "checkpoint" and mine[k] != other.get(k)]


@dataclass
class Summary:
    rows: int = 0  # embedded
    shards: int = 0
    resumed_shards: int = 0  # found complete and kept
    rejects: list[Reject] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


class Progress(tqdm):
    """The corpus bar: items/s and ETA (tqdm's), tokens/s and the rejects so far."""

    def __init__(self, total: int | None, disable: bool):
        super().__init__(total=total, desc="embed", unit="item", disable=disable, dynamic_ncols=True)
        self.tokens, self.rejected, self.begun = 0, 0, time.perf_counter()

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        self._show()

    def add_rejects(self, n: int, counted: bool = False) -> None:
        """`counted`: the rows were already counted as items (rejected while being embedded)."""
        self.rejected += n
        if not counted:
            self.update(n)
        self._show()

    def _show(self) -> None:
        rate = self.tokens / max(time.perf_counter() - self.begun, 1e-9)
        self.set_postfix_str(f"{rate:,.0f} tok/s, {self.rejected} rejected", refresh=False)


def expected_rows(path: str | Path) -> int | None:
    """How many records a corpus holds, for the bar's ETA: a JSONL file's non-blank lines, a Parquet
    file's row count (from its footer); None for a folder of images (not walked twice)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if path.is_file():
            with path.open("rb") as f:
                return sum(1 for line in f if line.strip())
    except Exception:  # noqa: BLE001 - an estimate only: the source itself reports a bad file
        return None
    return None


# -- the folder --------------------------------------------------------------------------
def prepare_folder(out: Path, job: Job, resume: bool, overwrite: bool) -> dict[int, dict]:
    """Ready `out` for the job; returns the complete shards a resumed run keeps, by number
    ({"rows", "digest", "sha256"}). Leftover temporary files are removed."""
    ours = _store_files(out)
    if resume and (out / JOB).is_file():
        try:
            recorded = json.loads((out / JOB).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or UTF-8
            recorded = None
        diff = job.differences(recorded) if isinstance(recorded, dict) else ["everything"]
        if diff:
            detail = ", ".join(f"{k}: {recorded.get(k)!r} then, {getattr(job, k)!r} now" for k in diff[:4]) \
                if isinstance(recorded, dict) else f"its {JOB} is damaged"
            raise InputError(f"{out} was written by another job ({detail}); it is never mixed with this one: "
                             "pass --overwrite to start again, or use another --out")
        for tmp in out.glob("*.tmp"):
            remove_leftover(tmp)  # a write the kill interrupted
        return _complete_shards(out, job)
    store = [p for p in ours if p.name != REJECTS]  # a failed run's rejects alone are not a store
    if resume:
        if store:
            raise InputError(f"{out} has no {JOB}: it is not a store this version can resume; pass --overwrite")
    elif store and not overwrite:
        raise InputError(f"{out} holds an embedding store; pass --resume to continue it or --overwrite to replace it")
    for path in ours:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / JOB, asdict(job))
    return {}


def _store_files(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.is_file() and (
        p.name in (MANIFEST, JOB, REJECTS, *_FORMAT1_FILES) or shard_number(p.name.removesuffix(".tmp")) is not None
        or p.name.endswith(".tmp"))]


def _complete_shards(out: Path, job: Job) -> dict[int, dict]:
    done = {}
    for path in sorted(out.glob("shard-*.safetensors")):
        number = shard_number(path.name)
        if number is None:
            continue
        meta, tensors = read_header(path)
        try:
            rows = tensors["unit"][1][0]
            info = {"rows": rows, "digest": meta["span"], "sha256": file_sha256(path)}
            ok = meta.get("job") == _job_digest(job) and tensors["unit"][1][1] == job.dim
        except (KeyError, IndexError, ValueError) as e:
            raise InputError(f"{path} is damaged ({e!r}): delete it and resume, or pass --overwrite") from None
        if not ok:
            raise InputError(f"{path} was written by another job; pass --overwrite to start again")
        done[number] = info
    return done


def _job_digest(job: Job) -> str:
    fields = {k: v for k, v in asdict(job).items() if k != "checkpoint"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# -- one task ----------------------------------------------------------------------------
def embed_task(model, task: Task, job: Job, out: Path, bar=None, log=None) -> dict:
    """Embed a task's rows and write its shard; returns its manifest entry and what it rejected."""
    from .pipeline import embed_rows

    ids, emb, more = embed_rows(model, task.rows, job.side, job.batch_size, log=log, bar=bar)
    entry = save_shard(out, job, task.number, ids, emb, task.rejects + more, task.digest())
    return {**entry, "rejects": [json.loads(r.to_json()) for r in more]}


def save_shard(out: Path, job: Job, number: int, ids: list, emb, rejects: list[Reject], span: str = "") -> dict:
    """Write shard `number` of the store `out`: its rows (ids, Embeddings) in the job's dtype, and
    the rejects of its span (`span`: the digest a resumed run checks). Returns its manifest entry."""
    meta = {"format": FORMAT, "shard": str(number), "job": _job_digest(job), "span": span,
            "ids": json.dumps(ids, ensure_ascii=False),
            "rejects": json.dumps([json.loads(r.to_json()) for r in sorted(rejects, key=lambda r: r.line)],
                                  ensure_ascii=False)}
    sha = write_shard(out / shard_name(number), encode(emb, store_dtype(job.dtype)), meta)
    return {"number": number, "rows": len(ids), "sha256": sha}


def _reject_of(d: dict) -> Reject:
    return Reject(d["line"], d["id"], d["reason"], d["row"])


# -- the job -------------------------------------------------------------------------------
def run(job: Job, source, out: Path, model_spec: dict, *, workers: list[str] | None = None, resume: bool = False,
        overwrite: bool = False, total: int | None = None, progress: bool = True, log=None, model=None,
        rejects_path: Path | None = None) -> Summary:
    """Embed `source` (Row | Reject, in corpus order) into the store `out` and write its manifest.

    model_spec: ReMatch.from_pretrained's arguments (path, backend, device, dtype, ...); `workers`:
    one device per worker process (None: in this process, with `model` if given). `total`: rows
    expected, for the bar's ETA (None: unknown). The rejects go to `rejects_path` (default
    OUT/rejects.jsonl). A corpus with no usable row leaves no store, only its rejects."""
    done = prepare_folder(out, job, resume, overwrite)
    summary = Summary(resumed_shards=len(done))
    entries: dict[int, dict] = {}
    tail_rejects: list[Reject] = []
    if not workers and model is None:  # loaded before the clock starts: the rates are the embedding's
        from .api import ReMatch

        model = ReMatch.from_pretrained(**model_spec)
    begun = time.perf_counter()
    with Progress(total, disable=not progress) as bar:
        def kept(task: Task) -> bool:
            """A task already done: check it still covers the same rows, count it."""
            info = done.get(task.number)
            if info is None:
                return False
            if info["digest"] != task.digest():
                raise InputError(f"the corpus changed since {out / shard_name(task.number)} was written (it covers "
                                 "other rows now): pass --overwrite to start again")
            entries[task.number] = {"number": task.number, "rows": info["rows"], "sha256": info["sha256"]}
            bar.update(len(task.rows) + len(task.rejects))
            return True

        def finished(entry: dict) -> None:
            entries[entry["number"]] = {k: entry[k] for k in ("number", "rows", "sha256")}
            bar.add_rejects(len(entry["rejects"]), counted=True)

        tasks = (t for t in plan_tasks(source, job.shard_rows) if not kept(t))
        if not workers:
            for task in tasks:
                if not task.rows:  # the corpus's last rows were all bad: no shard
                    tail_rejects += task.rejects
                    bar.add_rejects(len(task.rejects))
                    continue
                bar.add_rejects(len(task.rejects))
                finished(embed_task(model, task, job, out, bar, log))
        else:
            tail_rejects = _run_workers(tasks, job, out, model_spec, workers, bar, finished, log)
        summary.tokens = bar.tokens
    for number in sorted(entries):
        info = json.loads(read_header(out / shard_name(number))[0]["rejects"])
        summary.rejects += [_reject_of(d) for d in info]
    summary.rejects = sorted(summary.rejects + tail_rejects, key=lambda r: r.line)
    summary.shards = len(entries)
    summary.rows = sum(e["rows"] for e in entries.values())
    summary.seconds = time.perf_counter() - begun
    finish_store(out, job, [entries[n] for n in sorted(entries)], summary.rejects, rejects_path or out / REJECTS)
    return summary


def finish_store(out: Path, job: Job, entries: list[dict], rejects: list[Reject], rejects_path: Path) -> None:
    """The rejects file, then the manifest (entries from save_shard, in shard order), last: from
    now on the store is complete."""
    write_jsonl(rejects_path, [r.to_json() for r in rejects])
    if not any(e["rows"] for e in entries):  # nothing usable: no store, the rejects say why
        for path in _store_files(out):
            if path != rejects_path:
                path.unlink()
        return
    manifest = {"format": FORMAT, "side": job.side, "dim": job.dim, "dtype": job.dtype,
                "count": sum(e["rows"] for e in entries), "checkpoint": job.checkpoint,
                "fingerprint": job.fingerprint, "shard_rows": job.shard_rows,
                "shards": [{"file": shard_name(e["number"]), "rows": e["rows"], "sha256": e["sha256"]}
                           for e in entries]}
    write_json(out / MANIFEST, manifest)


# -- worker processes --------------------------------------------------------------------------
class _Relay:
    """A worker's stand-in for the bar: counts go to the main process."""

    def __init__(self, results):
        self.results = results

    def update(self, n: int) -> None:
        self.results.put(("items", n))

    def add_tokens(self, n: int) -> None:
        self.results.put(("tokens", n))

    def log(self, msg: str) -> None:
        self.results.put(("log", msg))


def _worker(model_spec: dict, device: str, threads: int, job: Job, out: str, tasks, results) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        from .api import ReMatch

        model = ReMatch.from_pretrained(**{**model_spec, "device": device})
        relay = _Relay(results)
        results.put(("ready", device))
        while (task := tasks.get()) is not None:
            results.put(("done", embed_task(model, task, job, Path(out), relay, relay.log)))
    except BaseException as e:  # the main process reports it and stops the others
        results.put(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))


def _run_workers(tasks, job: Job, out: Path, model_spec: dict, devices: list[str], bar: Progress, finished,
                 log) -> list[Reject]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
    task_q, results = ctx.Queue(maxsize=len(devices)), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    procs = [ctx.Process(target=_worker, args=(model_spec, d, threads, job, str(out), task_q, results), daemon=True)
             for d in devices]
    for p in procs:
        p.start()
    pending, tail = set(), []

    def drain(wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                msg = results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            kind = msg[0]
            if kind == "items":
                bar.update(msg[1])
            elif kind == "tokens":
                bar.add_tokens(msg[1])
            elif kind == "log" and log is not None:
                log(msg[1])
            elif kind == "done":
                pending.discard(msg[1]["number"])
                finished(msg[1])
            elif kind == "error":
                raise ReMatchError(f"a worker failed: {msg[1]}\n{msg[2]}")
        dead = [(d, p.exitcode) for d, p in zip(devices, procs) if p.exitcode not in (None, 0)]
        if dead or (pending and not any(p.is_alive() for p in procs)):
            said = ", ".join(f"{d} (exit {code})" for d, code in dead) or "every worker stopped"
            raise ReMatchError(f"a worker died: {said}; the complete shards are kept: run again with --resume")

    def put(item) -> None:
        while True:
            try:
                task_q.put(item, timeout=0.1)
                return
            except queue.Full:
                drain(0.0)

    try:
        for task in tasks:
            if not task.rows:
                tail += task.rejects
                bar.add_rejects(len(task.rejects))
                continue
            bar.add_rejects(len(task.rejects))
            pending.add(task.number)
            put(task)
            drain(0.0)
        for _ in procs:
            put(None)
        while pending:
            drain(0.5)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)  # reaped: no process left behind
    return tail
