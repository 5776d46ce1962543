"""Where runs execute: a local process pool (default) or Ray tasks. Both call `execute_task`
(`execute_run`, or `execute_shared` for runs that share a prefix)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stabilitybench.errors import StabilityBenchError
from stabilitybench.io import write_json
from stabilitybench.lifetime import die_with_parent
from stabilitybench.store import PREFIX_DIR, PREFIX_MEMBERS, RunWriter
from stabilitybench.types import RunStatus, last_error_line

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
# Imported once in the fork server, so each run's fresh process starts warm (torch.optim pulls in
# torch._dynamo on the first optimizer: ~1 s per process otherwise).
PRELOAD = (
    "stabilitybench.audit.fork_server",  # first: the fork server ends with the audit
    "torch",
    "torch._dynamo",
    "pandas",
    "pyarrow.parquet",
    "stabilitybench.audit.backends",
    "stabilitybench.telemetry",
    "stabilitybench.perturbations",
    "stabilitybench.workloads.toy",
)
# Imported once in the fork server too, by the workload kinds an audit runs, rather than once per
# run (every run is a fresh process): GPT-2's transformers modules take ~3.7 s to import, a tenth
# of a quickstart GPT-2 run.
KIND_PRELOAD: dict[str, tuple[str, ...]] = {
    "lm": ("transformers.models.gpt2.modeling_gpt2",),
    "rl": ("stable_baselines3",),
}
RAY_TASK_RETRIES = 1  # retries of a Ray task whose node or worker died mid-run
WORKER_DIED = (
    "worker process died while this run was in flight (killed by the OS, e.g. out of memory, "
    "or a crash in native code); rerun the audit to retry it"
)


@dataclass(frozen=True)
class RunTask:
    """What a worker needs to execute one run: the audit folder (absolute), the spec, run.json."""

    store_root: str
    spec: dict[str, Any]
    info: dict[str, Any]
    # further runs (spec, run.json) trained with this one up to where they part (`share_prefix`)
    shared: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = ()

    @property
    def run_id(self) -> str:
        return str(self.info["run_id"])

    def members(self) -> list[RunTask]:
        """This task's runs, one task each."""
        return [
            RunTask(self.store_root, self.spec, self.info),
            *(RunTask(self.store_root, spec, info) for spec, info in self.shared),
        ]


@dataclass(frozen=True)
class RunResult:
    """How one run ended, as reported back to the orchestrator."""

    run_id: str
    status: str  # done | failed
    error: str | None = None  # the last line of the traceback
    wall_s: float = 0.0


OnResult = Callable[[RunResult], None]


class Backend(Protocol):
    """Executes tasks and reports each result as soon as it is known."""

    def open(self) -> None:
        """Acquire what the backend needs (a Ray connection); a user error if it cannot."""
        ...

    def run(self, tasks: list[RunTask], on_result: OnResult) -> None: ...

    def close(self) -> None: ...


def worker_init() -> None:
    """A pool worker's initializer: one thread per run, and the worker ends with its parent
    (`lifetime.die_with_parent`: a killed audit leaves no run training on)."""
    die_with_parent()
    limit_threads()


def limit_threads() -> None:
    """One thread per run: runs are the unit of parallelism."""
    for name in THREAD_ENV:
        os.environ[name] = "1"
    import torch

    torch.set_num_threads(1)


def execute_run(store_root: str, spec: dict[str, Any], info: dict[str, Any]) -> RunResult:
    """Run one RunSpec in this process and record it; a raising workload is recorded `failed`."""
    import time
    import traceback

    from stabilitybench.types import RunSpec
    from stabilitybench.workloads.base import build_workload

    limit_threads()
    run_spec = RunSpec.from_dict(spec)
    writer = RunWriter(Path(store_root) / "runs" / run_spec.run_id)
    writer.start(info)
    started = time.time()
    try:
        workload = build_workload(run_spec.workload)
        outcome = workload.run(run_spec, writer)
    except (Exception, SystemExit):
        text = traceback.format_exc()
        writer.fail(text)
        return RunResult(
            run_spec.run_id, RunStatus.FAILED.value, last_line(text), time.time() - started
        )
    writer.finish(outcome)
    return RunResult(run_spec.run_id, RunStatus.DONE.value, None, time.time() - started)


def execute_task(
    store_root: str,
    spec: dict[str, Any],
    info: dict[str, Any],
    shared: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = (),
) -> list[RunResult]:
    """Run a task's runs in this process (forking where they share a prefix); their results."""
    if not shared:
        return [execute_run(store_root, spec, info)]
    return execute_shared(store_root, [(spec, info), *shared])


def execute_task_isolated(
    store_root: str,
    spec: dict[str, Any],
    info: dict[str, Any],
    shared: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = (),
) -> list[RunResult]:
    """`execute_task` in a Ray worker: runs that share a prefix fork (`os.fork`), and a Ray
    worker process, with threads of its own, deadlocks in a forked child; so they run in a
    fresh, single-threaded process of their own (spawned), which forks safely."""
    if not shared:
        return execute_task(store_root, spec, info)
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=worker_init) as pool:
        return pool.submit(execute_task, store_root, spec, info, shared).result()


def execute_shared(
    store_root: str, members: list[tuple[dict[str, Any], dict[str, Any]]]
) -> list[RunResult]:
    """Train runs that share a prefix (the workload's `run_shared`); a failing prefix fails
    every one of them. Each run's result is read back from its run.json."""
    import time
    import traceback

    from stabilitybench.types import RunSpec
    from stabilitybench.workloads.base import build_workload

    limit_threads()
    specs = [RunSpec.from_dict(spec) for spec, _ in members]
    writers = [RunWriter(Path(store_root) / "runs" / s.run_id) for s in specs]
    for writer, (_, info) in zip(writers, members, strict=True):
        writer.start(info)
    for run_spec in specs:  # an earlier, killed attempt's (its group may have begun elsewhere)
        shutil.rmtree(Path(store_root) / PREFIX_DIR / run_spec.run_id, ignore_errors=True)
    prefix = Path(store_root) / PREFIX_DIR / specs[0].run_id
    prefix.mkdir(parents=True)
    write_json(prefix / PREFIX_MEMBERS, [s.run_id for s in specs])  # for `watch`
    started = time.time()
    try:
        workload = build_workload(specs[0].workload)
        workload.run_shared(specs, writers, prefix)  # type: ignore[attr-defined]
    except (Exception, SystemExit):
        text = traceback.format_exc()
        for writer in writers:
            if writer.read_info().status == RunStatus.RUNNING:
                writer.fail(text)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
        with contextlib.suppress(OSError):
            prefix.parent.rmdir()  # only if no other prefix is training
    results = []
    for run_spec, writer in zip(specs, writers, strict=True):
        state = writer.read_info()
        if state.status == RunStatus.RUNNING:  # cannot happen, but never leave one running
            writer.fail("the shared prefix ended without running this run")
            state = writer.read_info()
        results.append(
            RunResult(
                run_spec.run_id,
                state.status.value,
                None if state.error is None else last_line(state.error),
                state.wall_s if state.wall_s is not None else time.time() - started,
            )
        )
    return results


last_line = last_error_line


def _fail_if_started(task: RunTask, error: str) -> RunResult | None:
    """After a worker died: record the run failed if it had started; None if it never began."""
    writer = RunWriter(_run_dir(task))
    info = writer.read_info()
    if info.status == RunStatus.PENDING:
        return None
    if info.status != RunStatus.RUNNING:  # finished just before the pool broke
        return RunResult(task.run_id, info.status.value, info.error)
    writer.fail(error)
    return RunResult(task.run_id, RunStatus.FAILED.value, last_line(error))


def _run_dir(task: RunTask) -> Path:
    return Path(task.store_root) / "runs" / task.run_id


def _pool_context(kinds: Iterable[str] = ()) -> Any:
    """forkserver with torch (and the libraries of the workload `kinds`) preloaded (cheap,
    fork-safe workers) where available, else spawn. The preload applies when this process
    starts its fork server: the first pool's kinds."""
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        extra = [m for kind in sorted(set(kinds)) for m in KIND_PRELOAD.get(kind, ())]
        context.set_forkserver_preload([*PRELOAD, *extra])
        return context
    return mp.get_context("spawn")


class LocalBackend:
    """A process pool, one run per worker process at a time, a fresh process for every run."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, tasks: list[RunTask], on_result: OnResult) -> None:
        pending = list(tasks)
        while pending:
            pending = self._run_pool(pending, on_result)

    def _run_pool(self, tasks: list[RunTask], on_result: OnResult) -> list[RunTask]:
        """Run tasks on one executor; return those that never started because the pool broke."""
        retry: list[RunTask] = []
        progressed = False
        with ProcessPoolExecutor(
            max_workers=min(self.workers, len(tasks)),
            mp_context=_pool_context(str(t.spec["workload"]["kind"]) for t in tasks),
            initializer=worker_init,
            max_tasks_per_child=1,  # a fresh process per run: no state leaks between runs
        ) as executor:
            futures: dict[Future[list[RunResult]], RunTask] = {
                executor.submit(execute_task, t.store_root, t.spec, t.info, t.shared): t
                for t in tasks
            }
            for future in as_completed(futures):
                task = futures[future]
                try:
                    results = future.result()
                except BrokenProcessPool:
                    results = []
                    for member in task.members():
                        maybe = _fail_if_started(member, WORKER_DIED)
                        if maybe is None:
                            retry.append(member)
                        else:
                            results.append(maybe)
                except Exception as exc:  # failed outside the workload (e.g. the disk)
                    text = f"{type(exc).__name__}: {exc}"
                    results = []
                    for member in task.members():
                        RunWriter(_run_dir(member)).fail(text)
                        results.append(RunResult(member.run_id, RunStatus.FAILED.value, text))
                progressed = progressed or bool(results)
                for result in results:
                    on_result(result)
        if retry and not progressed:
            for task in retry:
                RunWriter(_run_dir(task)).fail(WORKER_DIED)
                on_result(RunResult(task.run_id, RunStatus.FAILED.value, WORKER_DIED))
            return []
        return retry


class RayBackend:
    """The same runs as Ray tasks, on a cluster at `address` or on a local Ray instance."""

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.address = address
        self._owns_ray = False

    def open(self) -> None:
        try:
            import ray
        except ImportError:
            raise StabilityBenchError(
                "--backend ray needs Ray: pip install 'stabilitybench[ray]'"
            ) from None
        self._owns_ray = not ray.is_initialized()
        if not self._owns_ray:
            return
        if self.address:
            _check_reachable(self.address)
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
        try:
            if self.address:
                ray.init(address=self.address, **options)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local Ray instance"
            hint = ""
            if self.address and not os.environ.get("RAY_AUTH_MODE"):
                # `ray start --head` of recent Ray versions turns on token authentication.
                hint = (
                    "; if the cluster uses token authentication (the default of `ray start "
                    "--head` in recent Ray), set RAY_AUTH_MODE=token, with the cluster's token in "
                    "~/.ray/auth_token or RAY_AUTH_TOKEN"
                )
            raise StabilityBenchError(
                f"--ray-address: could not start or reach {where}: {last_line(str(exc))}{hint}"
            ) from None

    def close(self) -> None:
        import ray

        if self._owns_ray:
            ray.shutdown()

    def run(self, tasks: list[RunTask], on_result: OnResult) -> None:
        import ray

        # A task lost with its node or worker process (not a failing run: execute_run records those)
        # is retried once elsewhere; the retry starts the run afresh (`attempts` counts it).
        remote = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES)(execute_task_isolated)
        refs = {remote.remote(t.store_root, t.spec, t.info, t.shared): t for t in tasks}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            task = refs.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the worker died, or failed outside the run
                text = f"Ray task failed: {last_line(str(exc))}"
                results = []
                for member in task.members():
                    RunWriter(_run_dir(member)).fail(text)
                    results.append(RunResult(member.run_id, RunStatus.FAILED.value, text))
            for result in results:
                on_result(result)


def _check_reachable(address: str) -> None:
    """Fail fast on a `host:port` nobody listens on (Ray itself retries for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise StabilityBenchError(
            f"--ray-address: expected HOST:PORT, ray://HOST:PORT or auto, got {address!r}"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise StabilityBenchError(f"--ray-address: cannot reach {address}: {exc}") from None


def make_backend(name: str, workers: int | None, ray_address: str | None) -> Backend:
    """The backend named on the command line."""
    if workers is not None and workers < 1:
        raise StabilityBenchError(f"--workers must be >= 1, got {workers}")
    if name == "local":
        if ray_address:
            raise StabilityBenchError("--ray-address is only used with --backend ray")
        return LocalBackend(workers)
    if name == "ray":
        return RayBackend(workers, ray_address)
    raise StabilityBenchError(f"--backend: unknown backend {name!r}; allowed: local, ray")
