"""Run a :class:`~napari_stem_strain.methods.base.BlockMethod` on a Dask cluster.

The distributed engine does exactly what :func:`~napari_stem_strain.methods.runner.run_method`
does, only the ``process_block`` calls run on dask workers:

1. ``method.prepare(dataset)`` runs once, on the client, so every data-derived setting is fixed
   before any worker sees the method;
2. the prepared method is scattered ONCE to every worker (``broadcast=True``), not shipped with
   each task;
3. the scan is split into blocks of whole rows; each task receives only ``(path, dataset name,
   r0, r1)``, opens the file itself (read-only, cached per worker process) and reads its own
   rows - the patterns never travel through the client;
4. each block's rows of the method's declared outputs (``A``, ``sample`` and whatever else
   it declares, see :class:`~napari_stem_strain.methods.base.Output`) come back and are
   assembled by the same :class:`~napari_stem_strain.methods.runner.Assembly` as in one
   process (outputs declared ``window=True`` are buffered only until the rows above them are
   in, then fed band by band to the method's band consumer and dropped; so that an
   unfinished block cannot make the client buffer the rest of the scan, no block is
   submitted more than a few blocks ahead of the first unfinished one);
   ``method.finish`` runs on the client. The scattered method is
   :meth:`~napari_stem_strain.methods.base.BlockMethod.for_workers` - frozen, without
   per-position state, so its size does not grow with the scan; the rows of per-position
   inputs (a sample mask) travel with each task.

Because a block's result does not depend on other blocks (the BlockMethod contract), the
result is identical to the single-process runner's.

Faults: tasks are submitted with ``retries`` (a task that raises is tried again); a worker
that dies mid-run has its tasks re-run elsewhere by the scheduler; when no worker remains for
``no_worker_timeout`` seconds, or the scheduler gives up on a task that kept killing workers,
the run stops with one clear :class:`ClusterError` line. ``should_stop`` is polled while
waiting; it cancels every outstanding task and raises :class:`Cancelled`.

A dataset that has no file behind it (an in-memory array) still works: its blocks are read on
the client and sent to the workers, a few at a time so memory stays bounded.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io.dataset import Dataset, rows_per_block
from .io.errors import DataError
from .methods.base import (
    BlockMethod,
    MethodResult,
    ProgressCallback,
    StopCallback,
    check_stop,
    input_rows,
)
from .methods.runner import Assembly, check_inputs, run_block

__all__ = ["run_method_dask", "ClusterError", "DatasetRef", "parse_address", "probe_scheduler",
           "block_ranges"]

log = logging.getLogger(__name__)

#: How often (s) the client wakes up to poll ``should_stop`` and the worker count.
_POLL_S = 0.2


class ClusterError(ConnectionError):
    """The dask cluster cannot finish the run (unreachable, no workers left, a task that kept
    killing workers). An ``OSError``, so the CLI prints it as one line."""


# --------------------------------------------------------------------------------------------
# Addresses and blocks


#: The most local workers ``local:N`` starts (or 4 per CPU, if more).
MAX_LOCAL_WORKERS = 64

_LOCAL = re.compile(r"local(?::(?P<n>.*))?", re.IGNORECASE)
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[^:]*)")


def parse_address(address: str) -> tuple[str, int | None]:
    """``"local"`` / ``"local:N"`` -> ``("local", N)`` (a local cluster; only these literal
    words); ``"tcp://host:port"`` or ``"host:port"`` -> ``("tcp://host:port", None)`` (an
    existing scheduler: ``localhost:8786`` is a scheduler, not 8786 local workers).

    Raises ``ValueError`` naming the problem for anything else (a port that is not a number,
    a protocol other than tcp://).
    """
    text = str(address).strip()
    local = _LOCAL.fullmatch(text)
    if local:
        n = local.group("n")
        try:
            workers = int(n) if n else (os.cpu_count() or 1)
        except ValueError:
            raise ValueError(
                f"dask address {address!r}: expected local:N with N a whole number"
            ) from None
        if workers < 1:
            raise ValueError(f"dask address {address!r}: need at least one local worker")
        cpus = os.cpu_count() or 1
        if workers > max(MAX_LOCAL_WORKERS, 4 * cpus):
            raise ValueError(f"dask address {address!r}: {workers} local worker processes on "
                             f"a machine with {cpus} CPUs is not a sensible cluster (a "
                             "scheduler's address is host:port, e.g. localhost:8786)")
        return "local", workers
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    if scheme.lower() != "tcp":
        raise ValueError(
            f"dask address {address!r}: the {scheme}:// protocol is not supported (TLS and UCX "
            "need settings stem-strain does not make); use tcp://host:port or local:N"
        )
    m = _HOST_PORT.fullmatch(rest)
    if not m:
        raise ValueError(
            f"dask address {address!r} is neither local:N nor a scheduler address such as "
            "tcp://host:8786"
        )
    port = m.group("port")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"dask address {address!r}: the port {port!r} is not a number "
                         "from 1 to 65535")
    return f"tcp://{m.group('host')}:{int(port)}", None


def probe_scheduler(address: str, timeout: float) -> None:
    """Check that a dask scheduler answers at ``address`` (from :func:`parse_address`) within
    ``timeout`` seconds, the whole connection *and* handshake included.

    ``distributed.Client``'s own timeout covers only the TCP connect: a port that accepts and
    never answers hung it for ever, and a port that answers something else (an HTTP server,
    the dashboard) made it allocate exabytes. Raises :class:`ClusterError` (one line)."""
    import asyncio
    import concurrent.futures

    from distributed.comm import connect

    async def handshake() -> None:
        comm = await connect(address, timeout=timeout)
        await comm.close()

    def run() -> None:
        asyncio.run(asyncio.wait_for(handshake(), timeout))

    # a thread of its own: the caller's thread may already run an event loop
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dask-probe")
    try:
        pool.submit(run).result(timeout + 5)
    except TimeoutError:
        raise ClusterError(
            f"dask: nothing at {address} answered as a dask scheduler within {timeout:g} s "
            "(the port accepts connections but does not speak the dask protocol)"
        ) from None
    except OSError as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"cannot reach the dask scheduler at {address} ({msg})") from None
    except Exception as err:  # noqa: BLE001 - MemoryError, protocol errors: not a scheduler
        raise ClusterError(
            f"dask: {address} does not answer as a dask scheduler ({type(err).__name__}; is "
            "it the dashboard or another service? the scheduler listens on 8786 by default)"
        ) from None
    finally:
        pool.shutdown(wait=False)


def block_ranges(Rx: int, rows: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]`` covering ``0:Rx`` in blocks of ``rows`` scan rows."""
    rows = max(1, int(rows))
    return [(r0, min(Rx, r0 + rows)) for r0 in range(0, Rx, rows)]


def _rows_for(dataset: Any, budget: int, n_workers: int) -> int:
    """Rows per task: within the memory budget, and small enough that every worker gets
    several blocks (load balance, and a lost worker costs little)."""
    by_memory = rows_per_block(dataset.shape, budget, 4)
    Rx = dataset.scan_shape[0]
    by_balance = max(1, math.ceil(Rx / (4 * max(1, n_workers))))
    return max(1, min(by_memory, by_balance))


# --------------------------------------------------------------------------------------------
# Worker side: open the file by path, once per worker process


@dataclass(frozen=True)
class DatasetRef:
    """What a worker needs to reopen the client's dataset: path, dataset name, expected shape,
    and the file's size/mtime (so a file rewritten under the same name is reopened)."""

    path: str
    name: str
    shape: tuple[int, int, int, int]
    stamp: tuple[int, int]
    #: Sum of the first and last patterns as the client reads them: a worker that opens a
    #: different file under the same path (another machine) or a dataset whose data differ
    #: from the file's refuses to compute, rather than return a silently different map.
    fingerprint: tuple[float, float] = (float("nan"), float("nan"))

    @classmethod
    def from_dataset(cls, dataset: Any) -> DatasetRef | None:
        """A reference when the dataset is backed by a file the workers can open, else None."""
        source = getattr(dataset, "source", None)
        if source is None:
            return None
        p = Path(source).expanduser().resolve()
        if not p.is_file():
            return None
        st = p.stat()
        return cls(str(p), str(getattr(dataset, "name", "") or ""), tuple(dataset.shape),
                   (st.st_size, st.st_mtime_ns), _fingerprint(dataset))

    def open(self) -> Dataset:
        """Open the file read-only on this worker, check it matches what the client saw."""
        ds = _open_path(self.path, self.name, self.shape[:2])
        if tuple(ds.shape) != tuple(self.shape):
            ds.close()
            raise DataError(
                f"{self.path}: a dask worker sees shape {tuple(ds.shape)}, the client saw "
                f"{tuple(self.shape)} (is the file the same on every machine?)"
            )
        if not np.array_equal(_fingerprint(ds), self.fingerprint, equal_nan=True):
            ds.close()
            raise DataError(
                f"{self.path}: a dask worker reads different patterns from this file than the "
                "client (is the file the same on every machine?)"
            )
        return ds


def _fingerprint(dataset: Any) -> tuple[float, float]:
    """Float64 sums of the first and the last pattern (two one-row reads, as every block)."""
    Rx, Ry = dataset.scan_shape
    first = dataset.read_rows(0, 1)[0, 0].sum(dtype=np.float64)
    last = dataset.read_rows(Rx - 1, Rx)[0, Ry - 1].sum(dtype=np.float64)
    return float(first), float(last)


def _open_path(path: str, name: str, scan_shape: tuple[int, int]) -> Dataset:
    """Open ``path`` with the project's readers, as the client did."""
    from .io.readers import open_dataset

    if not Path(path).is_file():
        raise DataError(f"{path}: not found on the dask worker (workers open the input file "
                        "by path: it must be reachable under the same path everywhere)")
    # the client's scan shape, always: it may have come from the user (a 3D stack, or a
    # re-shaped scan); for a file that records the same shape it changes nothing
    return open_dataset(path, dataset=name or None, scan_shape=tuple(scan_shape))


_CACHE: OrderedDict[DatasetRef, Dataset] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def _worker_dataset(ref: DatasetRef) -> Dataset:
    """The open dataset for ``ref`` in this worker process (opened on first use)."""
    with _CACHE_LOCK:
        ds = _CACHE.get(ref)
        if ds is not None:
            _CACHE.move_to_end(ref)
            return ds
        ds = ref.open()
        _CACHE[ref] = ds
        while len(_CACHE) > _CACHE_SIZE:
            _, old = _CACHE.popitem(last=False)
            old.close()
        return ds


_Out = tuple[int, int, dict[str, np.ndarray]]


def _block_from_file(method: BlockMethod, ref: DatasetRef, r0: int, r1: int,
                     inputs: dict[str, np.ndarray]) -> _Out:
    """One task: read rows ``r0:r1`` on the worker and run the method on them (``inputs``:
    the block's rows of the method's per-position inputs, sent with the task).

    Opening and reading run under dask's local threaded scheduler: inside a task, a plain
    ``.compute()`` (a lazy reader probing its file, a dask-backed dataset) would otherwise be
    sent back to this very cluster and wait forever for a free one-thread worker.
    """
    import dask

    with dask.config.set(scheduler="threads"):
        block = _worker_dataset(ref).read_rows(r0, r1)  # h5py serialises reads itself
    return r0, r1, run_block(method, block, r0, inputs)


def _block_from_array(method: BlockMethod, block: np.ndarray, r0: int, r1: int,
                      inputs: dict[str, np.ndarray]) -> _Out:
    """One task of an in-memory dataset: the block arrives with the task."""
    return r0, r1, run_block(method, np.asarray(block, np.float32), r0, inputs)


# --------------------------------------------------------------------------------------------
# Client side


@contextmanager
def _client_for(address: str, local_processes: bool, connect_timeout: float
                ) -> Iterator[Any]:
    """A dask Client on ``address``; a ``local:N`` cluster is started and closed here."""
    from distributed import Client, LocalCluster

    where, n = parse_address(address)
    if where == "local":
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=local_processes, host="127.0.0.1",
            protocol="tcp://", dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
        )
        try:
            # never dask's default: other dask work in this process (napari computing a
            # lazy layer) must not be sent to the cluster while it runs
            with Client(cluster, set_as_default=False) as client:
                yield client
        finally:
            cluster.close()
        return
    probe_scheduler(where, connect_timeout)
    try:
        client = Client(where, timeout=f"{connect_timeout}s", set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ClusterError(f"cannot reach the dask scheduler at {where} ({err})") from err
    with client:
        yield client


def _n_workers(client: Any) -> int:
    try:
        return len(client.nthreads())
    except Exception:  # noqa: BLE001 - a scheduler hiccup: report none, retry next poll
        return 0


def run_method_dask(
    method: BlockMethod,
    dataset: Any,
    address: str,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    block_bytes: int | None = None,
    retries: int = 2,
    *,
    prepared: bool = False,
    local_processes: bool = True,
    no_worker_timeout: float = 30.0,
    connect_timeout: float = 10.0,
) -> MethodResult | Any:
    """Run ``method`` over ``dataset`` on the dask cluster at ``address``.

    ``address`` is ``"tcp://host:port"`` (an existing scheduler) or ``"local:N"`` (a
    LocalCluster of N single-threaded workers on 127.0.0.1, worker processes unless
    ``local_processes`` is False, closed afterwards). The result is identical to
    :func:`~napari_stem_strain.methods.runner.run_method`'s.

    ``progress(done_positions, total_positions, message)`` is called as blocks complete;
    ``should_stop()`` is polled about every 0.2 s and cancels the run (:class:`Cancelled`).
    Raises :class:`ClusterError` when the cluster cannot finish the run.
    """
    where, _ = parse_address(address)  # a bad address fails before prepare()
    if where != "local":
        probe_scheduler(where, connect_timeout)  # so does a scheduler that does not answer
    t0 = time.perf_counter()
    if not prepared:
        method.prepare(dataset, progress=progress, should_stop=should_stop)
    check_stop(should_stop)
    Rx, Ry = dataset.scan_shape
    total = Rx * Ry
    inputs = check_inputs(method, (Rx, Ry))
    out = Assembly(method, (Rx, Ry))
    ref = DatasetRef.from_dataset(dataset)
    budget = block_bytes or method.block_bytes

    with _client_for(address, local_processes, connect_timeout) as client:
        n_workers = _wait_for_workers(client, address, no_worker_timeout, should_stop,
                                      "has no workers")
        blocks = block_ranges(Rx, _rows_for(dataset, budget, n_workers))
        run = _BlockRun(client, method, dataset, ref, inputs, retries, address,
                        no_worker_timeout, should_stop)
        # windowed outputs: blocks completing ahead of an unfinished one wait on the client,
        # so submit at most a few blocks per worker beyond the first unfinished block
        ahead = max(4, 3 * n_workers) if out.windowed else None
        try:
            done_rows = 0
            for i, (r0, r1, rows) in enumerate(run.results(blocks, n_workers, ahead), 1):
                out.put(r0, r1, rows)
                done_rows += r1 - r0
                if progress is not None:
                    progress(done_rows * Ry, total,
                             f"{method.name}: {i}/{len(blocks)} blocks on dask")
        finally:
            run.release()
    check_stop(should_stop)
    return method.finish(out.results(), time.perf_counter() - t0)


class _BlockRun:
    """Submits blocks, yields their results as they complete, and repairs what the cluster
    loses: blocks whose task was dropped (e.g. every worker holding the scattered method died)
    are resubmitted with a freshly scattered method, up to ``retries + 1`` times each."""

    def __init__(self, client: Any, method: BlockMethod, dataset: Any, ref: DatasetRef | None,
                 inputs: dict[str, np.ndarray], retries: int, address: str,
                 no_worker_timeout: float, should_stop: StopCallback | None) -> None:
        self.client = client
        self.method = method.for_workers()
        self.inputs = inputs
        self.dataset = dataset
        self.ref = ref
        self.retries = max(0, int(retries))
        self.address = address
        self.no_worker_timeout = no_worker_timeout
        self.should_stop = should_stop
        #: future -> (r0, r1, the scattered method it uses)
        self.pending: dict[Any, tuple[int, int, Any]] = {}
        #: set whenever a pending future finishes (its done-callback): ``distributed.wait``
        #: would need this run's Client to be dask's default, which it never is
        self.changed = threading.Event()
        self.method_losses = 0
        self.method_stale = False
        self.method_f: Any = self._scatter()

    def _scatter(self) -> Any:
        """Scatter the method to every worker. A worker that dies while it receives the
        method (a large one takes seconds to send) closes the stream: the scatter is tried
        again on the workers left, up to ``retries + 1`` more times."""
        for attempt in range(self.retries + 2):
            try:
                return self.client.scatter(self.method, broadcast=True, hash=False)
            except (OSError, TimeoutError) as err:  # CommClosedError is an OSError
                if attempt > self.retries:
                    raise ClusterError(f"dask: could not send the method to the workers at "
                                       f"{self.address} ({type(err).__name__}: "
                                       f"{str(err).splitlines()[0] if str(err) else ''})"
                                       ) from err
                log.info("scatter failed (%s); retrying on the workers left", err)
                _wait_for_workers(self.client, self.address, self.no_worker_timeout,
                                  self.should_stop, "has no workers left")
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(self, r0: int, r1: int) -> None:
        if self.method_stale or self.method_f.status != "finished":  # lost with its workers
            self.method_stale = False
            self.method_losses += 1
            if self.method_losses > 2 * (self.retries + 1):
                raise ClusterError(f"dask: the workers at {self.address} lost the method "
                                   f"{self.method_losses} times (workers keep dying)")
            time.sleep(2 * _POLL_S)  # let the scheduler notice the dead worker first
            _wait_for_workers(self.client, self.address, self.no_worker_timeout,
                              self.should_stop, "has no workers left")
            self.method_f = self._scatter()
        if self.ref is not None:
            fut = self.client.submit(_block_from_file, self.method_f, self.ref, r0, r1,
                                     input_rows(self.inputs, r0, r1),
                                     retries=self.retries, pure=False)
        else:
            fut = self.client.submit(_block_from_array, self.method_f,
                                     self.dataset.read_rows(r0, r1), r0, r1,
                                     input_rows(self.inputs, r0, r1),
                                     retries=self.retries, pure=False)
        self.pending[fut] = (r0, r1, self.method_f)
        fut.add_done_callback(lambda _: self.changed.set())

    def results(self, blocks: list[tuple[int, int]], n_workers: int,
                ahead: int | None = None) -> Iterator[_Out]:
        """``(r0, r1, rows of every declared output)`` of every block, in completion order.
        ``ahead``: submit no block more than this many blocks after the first block not yet
        yielded (None: no such limit)."""
        from distributed.scheduler import KilledWorker

        todo = list(reversed(blocks))
        index = {r0: i for i, (r0, _) in enumerate(blocks)}
        done = [False] * len(blocks)
        first_open = 0
        # A file-backed run submits every (tiny) task at once; an in-memory one sends a few
        # blocks at a time so the client never holds more than a handful of them.
        window = len(blocks) if self.ref is not None else max(2, 2 * n_workers)
        reach = len(blocks) if ahead is None else max(1, int(ahead))
        no_worker_since: float | None = None
        n_done = 0
        while todo or self.pending:
            while (todo and len(self.pending) < window
                   and index[todo[-1][0]] < first_open + reach):
                self.submit(*todo.pop())
            check_stop(self.should_stop)
            # until a block finishes (or a poll's time passes); cleared before the statuses
            # are read, so a block finishing after this wakes the next wait at once
            self.changed.wait(_POLL_S)
            self.changed.clear()
            finished = [f for f in self.pending if f.status != "pending"]
            for fut in finished:
                r0, r1, used = self.pending.pop(fut)
                out = None
                if fut.status == "finished":
                    try:
                        out = fut.result()
                    except (OSError, CancelledError):  # its worker died before we gathered
                        out = None
                if out is not None:
                    n_done += 1
                    done[index[r0]] = True
                    while first_open < len(blocks) and done[first_open]:
                        first_open += 1
                    yield out
                elif fut.status == "error":
                    try:
                        fut.result()
                    except KilledWorker as err:
                        raise ClusterError(
                            f"dask: the block of rows {r0}:{r1} kept killing workers; "
                            f"stopped after {n_done}/{len(blocks)} blocks"
                        ) from err
                else:  # cancelled or lost by the cluster
                    # A worker died: the scheduler drops the tasks that needed what it held
                    # - often the scattered method, even while the client still sees that
                    # future as finished. The first such block of a wave replaces the method
                    # (a fresh scatter, bounded in submit()); the block is never at fault.
                    if used is self.method_f:
                        self.method_stale = True
                    self.submit(r0, r1)
            if finished:
                no_worker_since = None
            elif _n_workers(self.client) == 0:
                no_worker_since = no_worker_since or time.monotonic()
                if time.monotonic() - no_worker_since > self.no_worker_timeout:
                    raise ClusterError(
                        f"dask: no workers left at {self.address} for "
                        f"{self.no_worker_timeout:.0f} s; stopped after "
                        f"{n_done}/{len(blocks)} blocks"
                    )

    def release(self) -> None:
        """Cancel whatever is still running and drop the scattered method."""
        try:
            self.client.cancel([*self.pending, self.method_f], force=True)
        except Exception:  # noqa: BLE001 - the client may already be closing
            pass
        self.pending.clear()


def _wait_for_workers(client: Any, address: str, timeout: float,
                      should_stop: StopCallback | None, what: str) -> int:
    """Number of workers, waiting up to ``timeout`` s for the first to join."""
    t_end = time.monotonic() + timeout
    while True:
        n = _n_workers(client)
        if n:
            return n
        check_stop(should_stop)
        if time.monotonic() > t_end:
            raise ClusterError(f"dask: the scheduler at {address} {what} "
                               f"(waited {timeout:.0f} s)")
        time.sleep(_POLL_S)
