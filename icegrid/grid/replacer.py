"""The job replacer: resubmit batch jobs that left the queue, keeping the wanted number of worker jobs.

dask-jobqueue records a worker as soon as its job is submitted and never checks the queue again: a
job that is held, removed, preempted or killed at walltime before (or after) its worker connected
stays counted, so the cluster silently shrinks. Every ``poll_seconds`` the replacer reads the queue
(the profile's :meth:`~icegrid.grid.profiles.base.Profile.queue`, by the campaign's job tag); a job
missing from it twice in a row, or one whose submission failed, is forgotten and a new one submitted.

A job whose worker the liveness check found stuck (a frozen process keeps its batch slot until walltime)
is cancelled here too, dask-jobqueue's way (its ``cancel_command`` with the job id, through
``scale_down`` on the cluster's event loop), and replaced at once from the same budget.
"""

from __future__ import annotations

import copy
import logging
import re
import threading

log = logging.getLogger("icegrid.grid")


class JobReplacer:
    """Watches one dask-jobqueue cluster's jobs for a batch profile, on a thread of its own."""

    def __init__(self, cluster, profile):
        self.cluster = cluster
        self.profile = profile
        self.poll_seconds = profile.settings.poll_seconds
        self.max_replacements = profile.settings.max_replacements
        self.target = 0
        self.replaced = 0
        self.last_problem: str | None = None   # e.g. the hold reason of the last job that left
        self._suspects: set[str] = set()
        self.on_memory = None   # (worker name, reason) for a job the batch system ended for memory (grid/oom.py)
        self._budget = threading.Lock()   # replaced: counted by this thread and by retire on the cluster's loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"icegrid-{profile.pool_name}-replacer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_seconds + 35)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception as err:  # keep watching: a failed check must not end the campaign
                log.warning("job replacer (%s): %s", self.profile.pool_name, err)

    @property
    def exhausted(self) -> bool:
        return self.replaced >= self.max_replacements

    def check(self) -> list[str]:
        """One look at the queue; returns the worker names whose jobs are being replaced."""
        if self.target <= 0:
            return []
        jobs = dict(self.cluster.workers.items())
        submitted = {name: job.job_id for name, job in jobs.items() if getattr(job, "job_id", None)}
        failed = {name for name, job in jobs.items() if getattr(job, "submit_error", None)}
        if not submitted and not failed:
            return []
        answer = self.profile.queue(set(submitted.values())) if submitted else (set(), {})
        if answer is None:
            return []
        queued, problems = answer
        for name, job_id in submitted.items():
            if job_id in problems:
                self.last_problem = f"job {job_id}: {problems[job_id]}"
                self._memory_problem(name, job_id, problems[job_id])
        missing = {name for name, job_id in submitted.items() if job_id not in queued}
        gone = sorted((missing & self._suspects) | failed)
        self._suspects = missing - set(gone)
        if not gone or self.profile.submit_problem():
            return []   # nothing left, or no submission ever worked: the pool reports that instead
        left = len(gone)
        with self._budget:
            gone = gone[:max(self.max_replacements - self.replaced, 0)]
            self.replaced += len(gone)
        if not gone:
            log.warning("%s: %d worker jobs left the queue; not replacing (max_replacements=%d reached)",
                        self.profile.pool_name, left, self.max_replacements)
            return []
        if self.last_problem:
            log.warning("%s: %s", self.profile.pool_name, self.last_problem)
        ids = ", ".join(submitted.get(n, f"{n} (not submitted)") for n in gone)
        log.info("%s: jobs %s left the queue; submitting replacements", self.profile.pool_name, ids)
        self.cluster.loop.add_callback(self._replace, gone)
        return gone

    def _memory_problem(self, name: str, job_id: str, reason: str) -> None:
        from icegrid.grid.oom import batch_memory_reason

        if self.on_memory is not None and batch_memory_reason(reason):
            self.on_memory(str(name), f"ended by {self.profile.name} for memory (job {job_id}: {reason:.200})")

    def _replace(self, names: list[str]) -> None:
        # On the cluster's event loop: SpecCluster state is not thread-safe.
        if self.target <= 0 or self.cluster.status.name in ("closing", "closed"):
            return
        for name in names:
            spec = self.cluster.worker_spec.pop(name, None) or self.cluster.new_spec   # a grown job stays grown
            self.cluster.worker_spec[self._fresh_name(name)] = copy.deepcopy(spec)
        # Same size: scale() only reconciles — cancel the forgotten jobs, submit the new ones.
        self.cluster.scale(jobs=len(self.cluster.worker_spec))

    def _fresh_name(self, name) -> str:
        # A fresh name: SpecCluster would hand out the forgotten one again (it only skips names still in
        # worker_spec), which it still holds as a live job and so would never start.
        base = re.sub(r"-r\d+$", "", str(name))
        return f"{base}-r{self.replaced}"

    # -- a stuck worker's job (icegrid/grid/liveness.py), asked from the manager's thread
    def retire(self, worker_name, timeout: float = 30.0) -> str | None:
        """Cancel the job that holds the worker called ``worker_name`` and submit its replacement;
        returns how, for the requeue reason, or None when no submitted job of this cluster holds it.
        Blocks the calling thread (never the cluster's loop) until the cancel command has run."""
        from distributed.utils import sync

        try:
            return sync(self.cluster.loop, self._retire, str(worker_name), callback_timeout=timeout)
        except TimeoutError:
            return f"the job of {worker_name} not yet cancelled after {timeout:g} s"
        except RuntimeError as err:   # the cluster's loop is closed: the campaign is ending
            return f"the job of {worker_name} not cancelled ({err})"

    async def _retire(self, worker_name: str) -> str | None:
        import asyncio

        cluster = self.cluster
        job_name = job_of(cluster.worker_spec, worker_name)
        job = cluster.workers.get(job_name) if job_name is not None else None
        if job is None or not getattr(job, "job_id", None) or cluster.status.name in ("closing", "closed"):
            return None
        how = f"job {job.job_id} removed ({job.cancel_command.split()[0]})"
        with self._budget:
            replace = self.target > 0 and self.replaced < self.max_replacements
            self.replaced += int(replace)
        if replace:
            cluster.worker_spec[self._fresh_name(job_name)] = copy.deepcopy(cluster.worker_spec[job_name])
            how += ", a replacement submitted"
        elif self.target > 0:
            how += f", not replaced (max_replacements={self.max_replacements} reached)"
        log.info("%s: %s (worker %s stuck)", self.profile.pool_name, how, worker_name)
        # scale_down: the job leaves worker_spec, then SpecCluster closes it (Job.close: cancel_command
        # job_id) and submits the replacement. Shielded: a timeout above must not cut that short.
        await asyncio.shield(cluster.scale_down([job_name]))
        return how


def job_of(worker_spec: dict, worker_name: str):
    """The job (its worker_spec name) that runs the worker ``worker_name``: the job's own name, or the
    job's name with a process suffix (``processes`` > 1: dask-jobqueue's spec ``group``, e.g. ``-0``)."""
    for name, spec in list(worker_spec.items()):
        if str(name) == worker_name or worker_name in {f"{name}{suffix}" for suffix in spec.get("group", ())}:
            return name
    return None
