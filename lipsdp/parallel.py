"""Certified robustness of a whole data set, as independent units on one process, N processes or Dask.

The work of ``lipsdp robustness`` splits into units that do not depend on each other
(docs/math.md §9):

* **bound units**: one SDP each, the global bound of :math:`f` (``method="global"``), or the bound
  :math:`L_{yj}` of one logit difference :math:`f_y-f_j` (``method="pairwise"``, ``K(K-1)/2`` units);
* **sample units**: the certified radii :math:`r(x)=\\min_{j\\ne y}m_j(x)/L_{yj}` of a chunk of
  samples, once the bounds are known.

An executor runs them: :class:`SerialExecutor` (this process), :class:`ProcessExecutor` (N local
processes started with ``spawn``, one BLAS thread each) or :class:`DaskExecutor` (a running
``dask.distributed`` scheduler; the optional extra ``lipsdp[distributed]``). Every unit pins BLAS to one
thread, so the three give bit-identical results. Each result is appended to a JSON-lines file as it
finishes (:class:`ResultLog`); its first line holds the digests of the model and the data and the
options, so a rerun with the same file resumes without recomputing finished units, and a file from
another run is refused rather than mixed in.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pickle
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from lipsdp.dataset import data_digest
from lipsdp.errors import LipSDPError
from lipsdp.robustness import certified_radii, global_certificate, local_radii, pair_certificate

__all__ = ["DatasetResult", "ResultLog", "SerialExecutor", "ProcessExecutor", "DaskExecutor", "StoppedEarly",
           "bound_units", "compute", "evaluate_dataset", "make_executor"]

FORMAT = "lipsdp-robustness/1"
METHODS = ("global", "pairwise", "local")
#: Samples per sample unit: large enough that a unit is worth sending, small enough to stream.
CHUNK = 256


class StoppedEarly(Exception):
    """Raised by :func:`evaluate_dataset` after ``stop_after`` units (a hook to test resuming)."""


def bound_units(num_classes: int, method: str) -> list[dict]:
    """The SDP units of a method: ``[{"id": "global"}]`` or one ``{"id": "pair y j", "pair": [y, j]}`` per pair."""
    if method in ("global", "local"):  # local: each sample's own bound, never above the global one
        return [{"kind": "bound", "id": "global"}]
    return [{"kind": "bound", "id": f"pair {y} {j}", "pair": [y, j]}
            for y in range(num_classes) for j in range(y + 1, num_classes)]


def compute(network, task: dict) -> dict:
    """Run one unit on ``network`` and return its JSON-ready record (the same on every executor)."""
    t0 = time.perf_counter()
    opts = task["options"]
    if task["kind"] == "bound":
        if "pair" in task:
            y, j = task["pair"]
            cert = pair_certificate(network, y, j, norm=opts["norm"], solver=opts["solver"],
                                    formulation=opts["formulation"], time_limit=opts["time_limit"])
        else:
            cert = global_certificate(network, norm=opts["norm"], solver=opts["solver"],
                                      formulation=opts["formulation"], time_limit=opts["time_limit"])
        record = {"id": task["id"], "bound": float(cert.bound) if cert.verified else None,
                  "verified": bool(cert.verified), "status": cert.status, "solver": cert.solver}
        if "pair" in task:
            record["pair"] = list(task["pair"])
    elif opts["method"] == "local":
        record = {"id": task["id"], "start": task["start"], **{k: (v.tolist() if hasattr(v, "tolist") else v)
                  for k, v in local_radii(network, task["x"], task["y"], task["L"], opts["region_radius"],
                                          opts["norm"], solver=opts["solver"], formulation=opts["formulation"],
                                          time_limit=opts["time_limit"]).items()}}
    else:
        res = certified_radii(network, task["x"], task["y"], L=task["L"], norm=opts["norm"])
        record = {"id": task["id"], "start": task["start"], "radii": res.radii.tolist(),
                  "predictions": res.predictions.tolist(), "binding": res.binding.tolist()}
    record["seconds"] = time.perf_counter() - t0
    return record


# -- executors ----------------------------------------------------------------------------------------

_WORKER_NETWORK = None


def _pin_threads() -> None:
    """One BLAS / torch thread in a worker process, for the whole process (workers run one unit at a time)."""
    threadpool_limits(limits=1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _process_init(payload: bytes) -> None:
    global _WORKER_NETWORK
    _pin_threads()
    _WORKER_NETWORK = pickle.loads(payload)


def _process_task(task: dict) -> dict:
    return compute(_WORKER_NETWORK, task)


def dask_task(network, task: dict) -> dict:
    """A unit on a Dask worker (public: Dask pickles it by reference, so workers need lipsdp installed)."""
    _pin_threads()
    return compute(network, task)


class SerialExecutor:
    """Units one after another in this process, with BLAS pinned to one thread while each runs."""

    def __init__(self, network):
        self.network = network

    def run(self, tasks):
        for task in tasks:
            with threadpool_limits(limits=1):
                yield task, compute(self.network, task)

    def close(self) -> None:
        pass


class ProcessExecutor:
    """Units on ``workers`` local processes (``spawn``: no forked solver or BLAS state), as they finish."""

    def __init__(self, network, workers: int):
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_process_init, initargs=(pickle.dumps(network),))

    def run(self, tasks):
        futures = {self.pool.submit(_process_task, task): task for task in tasks}
        for fut in concurrent.futures.as_completed(futures):
            yield futures[fut], fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Units on a running ``dask.distributed`` cluster (``dask scheduler`` / ``dask worker``), as they finish.

    The network is sent to every worker once (``scatter``); workers need lipsdp importable.
    """

    def __init__(self, network, address: str, timeout: float = 20.0):
        try:
            import distributed  # optional: the `distributed` extra
        except ImportError:
            raise LipSDPError("--scheduler needs dask.distributed: pip install 'lipsdp[distributed]'") from None
        self.distributed = distributed
        try:
            self.client = distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise LipSDPError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            self.client.close()
            raise LipSDPError(f"no Dask worker joined the scheduler at {address} within {timeout:g} s "
                              f"(start one: dask worker {address} --nthreads 1)") from None
        self.network = self.client.scatter(network, broadcast=True)

    def run(self, tasks):
        futures = {}
        for task in tasks:
            futures[self.client.submit(dask_task, self.network, task, pure=False, key=f"lipsdp-{task['id']}-"
                                       f"{os.urandom(4).hex()}")] = task
        for fut, record in self.distributed.as_completed(list(futures), with_results=True, loop=self.client.loop):
            yield futures[fut], record

    def close(self) -> None:
        self.client.close()


def make_executor(network, workers: int | None = None, scheduler: str | None = None):
    """:class:`DaskExecutor` with ``scheduler``, :class:`ProcessExecutor` with ``workers > 1``, else serial."""
    if scheduler:
        if workers and workers > 1:
            raise LipSDPError("give --workers or --scheduler, not both (Dask workers are started with the cluster)")
        return DaskExecutor(network, scheduler)
    if workers is not None and workers > 1:
        return ProcessExecutor(network, workers)
    return SerialExecutor(network)


# -- the results file -----------------------------------------------------------------------------------

class ResultLog:
    """Unit records, in memory and (with ``path``) appended to a JSON-lines file as they finish.

    The first line is ``header``: the format, the model's fingerprint, the data's digest and every
    option that changes a unit's result. An existing file with a different header is refused (exit 2);
    one with the same header is resumed: its records count as done. A last line cut off by a kill is
    dropped.
    """

    def __init__(self, header: dict, path: str | None = None):
        self.header, self.path, self.done = header, path, {}
        if path is None:
            return
        first = (json.dumps(header) + "\n").encode()
        try:
            with open(path, "a+b") as fh:  # creates it
                fh.seek(0)
                raw = fh.read()
            if b"\n" in raw:
                self._resume(path, raw)
            elif first.startswith(raw):  # empty, or only a header cut off by a kill: start afresh
                with open(path, "wb") as fh:
                    fh.write(first)
            else:
                raise LipSDPError(f"{path} is not a lipsdp robustness results file; use another --out")
        except OSError as exc:
            raise LipSDPError(f"cannot use --out {path}: {exc.strerror or exc}") from None

    def _resume(self, path: str, raw: bytes) -> None:
        good = raw.rfind(b"\n") + 1  # a last line without its newline was cut off by a kill: it goes
        lines = raw[:good].split(b"\n")[:-1]
        try:
            found = json.loads(lines[0])
        except ValueError:
            raise LipSDPError(f"{path} is not a lipsdp robustness results file; use another --out") from None
        if not isinstance(found, dict) or found.get("format") != FORMAT:
            raise LipSDPError(f"{path} is not a lipsdp robustness results file; use another --out")
        differs = [k for k in sorted(set(found) | set(self.header)) if found.get(k) != self.header.get(k)]
        if differs:
            raise LipSDPError(f"{path} holds results of another run ({', '.join(differs)} differ); use another "
                              f"--out or delete the file")
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                self.done[record["id"]] = record
            except (ValueError, TypeError, KeyError):
                raise LipSDPError(f"{path}, line {number}: not a unit record; use another --out or delete "
                                  f"the file") from None
        if good < len(raw):
            with open(path, "r+b") as fh:
                fh.truncate(good)

    def add(self, record: dict) -> None:
        self.done[record["id"]] = record
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()


# -- the whole run -----------------------------------------------------------------------------------------

@dataclass
class DatasetResult:
    """Certified radii of a data set (docs/math.md §9) and the bounds they used.

    ``radii[i]`` is 0 for a misclassified sample; sample ``i`` is certified at radius ``r`` when
    ``radii[i] > r``. ``bounds`` holds one record per SDP (``bound`` is None where it did not verify:
    that pair then counts as an infinite bound, so no sample is certified through it). ``computed`` and
    ``reused`` count units run now and units read back from the results file. ``local_bounds`` (method
    ``local``): each sample's verified local bound, None where none was needed or verified.
    """

    radii: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    binding: np.ndarray
    bounds: list[dict]
    method: str
    norm: str
    computed: int = 0
    reused: int = 0
    header: dict = field(default_factory=dict)
    local_bounds: list | None = None

    @property
    def clean_accuracy(self) -> float:
        return float((self.predictions == self.labels).mean())

    @property
    def verified(self) -> bool:
        return all(b["verified"] for b in self.bounds)

    def certified_accuracy(self, radius: float) -> float:
        """The fraction of samples correct and certified at ``radius``: ``radii > radius`` (open ball)."""
        return float((self.radii > radius).mean())


def _bound_matrix(records: list[dict], method: str, num_classes: int):
    """What :func:`certified_radii` takes as ``L``: the global bound, or the pairwise matrix (inf: not verified)."""
    if method in ("global", "local"):
        rec = records[0]
        if rec["verified"]:
            return float(rec["bound"])
        return np.where(np.eye(num_classes, dtype=bool), 0.0, np.inf)
    L = np.full((num_classes, num_classes), np.inf)
    np.fill_diagonal(L, 0.0)
    for rec in records:
        if rec["verified"]:
            y, j = rec["pair"]
            L[y, j] = L[j, y] = rec["bound"]
    return L


def _run(executor, tasks, log: ResultLog, counter: list, stop_after, advance) -> None:
    for _, record in executor.run(tasks):
        log.add(record)
        counter[0] += 1
        advance()
        if stop_after is not None and counter[0] >= stop_after:
            raise StoppedEarly(f"stopped after {counter[0]} units")


def evaluate_dataset(network, x, y, *, method: str = "pairwise", norm: str = "l2", solver: str = "auto",
                     formulation: str = "neuron", time_limit: float | None = None, executor=None,
                     out: str | None = None, chunk: int = CHUNK, progress=None,
                     stop_after: int | None = None, region_radius: float | None = None) -> DatasetResult:
    """Certified radii of every sample of a checked data set, unit by unit (module docstring).

    Parameters
    ----------
    network : Network
        The validated classifier (logits out).
    x, y : ndarray
        Inputs ``(N, input_dim)`` float64 and labels ``(N,)`` int64, as :func:`lipsdp.dataset.check_data`
        returns them.
    method : {"global", "pairwise", "local"}
        ``local``: each sample's local bound on its ball of radius ``region_radius``
        (:func:`lipsdp.robustness.local_radii`), its radius capped there.
    norm : {"l2", "linf"}
    solver, formulation, time_limit
        As for :func:`lipsdp.certify`; ``time_limit`` is per SDP.
    executor : SerialExecutor, ProcessExecutor or DaskExecutor, optional
        Where units run (default: this process). Not closed here.
    out : str, optional
        The JSON-lines results file: streamed to, and resumed from.
    chunk : int
        Samples per sample unit.
    progress : callable(total, done) -> callable(), optional
        Called once with the number of units and those already done; returns the callable invoked
        after each unit finishes (a progress bar).
    stop_after : int, optional
        Raise :class:`StoppedEarly` after this many units were computed (a test hook for resuming).
    """
    if method not in METHODS:
        raise LipSDPError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "local" and (region_radius is None or not region_radius >= 0):
        raise LipSDPError("method 'local' needs region_radius >= 0 (the radius of each sample's ball)")
    k = network.output_dim
    options = {"method": method, "norm": norm, "solver": solver, "formulation": formulation,
               "time_limit": time_limit, **({"region_radius": float(region_radius)} if method == "local" else {})}
    header = {"format": FORMAT, "model": network.fingerprint(), "data": data_digest(x, y), "chunk": chunk,
              **options}
    log = ResultLog(header, out)
    executor = executor or SerialExecutor(network)
    units = bound_units(k, method)
    starts = list(range(0, len(x), chunk))
    reused = sum(u["id"] in log.done for u in units) + sum(f"samples {s}" in log.done for s in starts)
    advance = progress(len(units) + len(starts), reused) if progress else (lambda: None)
    counter = [0]
    _run(executor, [{**u, "options": options} for u in units if u["id"] not in log.done], log, counter,
         stop_after, advance)
    bounds = [log.done[u["id"]] for u in units]
    L = _bound_matrix(bounds, method, k)
    tasks = [{"kind": "samples", "id": f"samples {s}", "start": s, "x": x[s:s + chunk], "y": y[s:s + chunk],
              "L": L, "options": options} for s in starts if f"samples {s}" not in log.done]
    _run(executor, tasks, log, counter, stop_after, advance)
    parts = [log.done[f"samples {s}"] for s in starts]
    cat = {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in ("radii", "predictions", "binding")}
    return DatasetResult(radii=cat["radii"].astype(np.float64), predictions=cat["predictions"].astype(np.int64),
                         labels=y, binding=cat["binding"].astype(np.int64), bounds=bounds, method=method,
                         norm=norm, computed=counter[0], reused=reused, header=header,
                         local_bounds=[b for p in parts for b in p["local_bounds"]] if method == "local" else None)
