"""Draw jobs: every draw runs in a worker thread; the request waits for it up to the request
timeout and, when it is not done by then, answers 202 with the job's id to poll.

One worker: the models take turns anyway (``Service.model_lock``), and one worker keeps draws in
the order they came. Finished jobs are kept ``keep_s`` seconds (at most ``max_kept`` of them) for
their client to collect; at most ``max_pending`` wait or run at once, so a burst of requests is
refused with 429 instead of queueing without bound.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import BusyError, NotFoundError, error_status


@dataclass
class Job:
    id: str
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued -> running -> done | failed
    started: float | None = None
    finished: float | None = None
    progress: dict[str, int] | None = None  # {"step": i, "of": n}, set by the work as it goes
    result: Any = None
    failure: tuple[int, dict, dict] | None = None  # error_status() of what the work raised
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def report(self) -> dict[str, Any]:
        """The job as GET /v1/jobs/{id} shows it (``result`` as the work returned it)."""
        return {"job": self.id, "status": self.status, "created": self.created, "started": self.started,
                "finished": self.finished, "progress": self.progress,
                "result": self.result if self.status == "done" else None,
                "error": self.failure[1]["error"] if self.failure is not None else None}


class JobRunner:
    def __init__(self, *, keep_s: float = 3600.0, max_kept: int = 256, max_pending: int = 16):
        self.keep_s, self.max_kept, self.max_pending = keep_s, max_kept, max_pending
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmrag-serve-draw")

    def submit(self, work: Callable[[Job], Any]) -> Job:
        """Queue ``work(job)``; its return value becomes ``job.result``, an exception ``job.error``."""
        with self._lock:
            self._expire()
            pending = sum(not j.done.is_set() for j in self._jobs.values())
            if pending >= self.max_pending:
                raise BusyError(f"{pending} draws are already waiting or running (the limit is {self.max_pending}); "
                                "try again when one is done.", headers={"Retry-After": "10"})
            job = Job(id=secrets.token_urlsafe(12))
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        job.started, job.status = time.time(), "running"
        try:
            job.result = work(job)
            job.status = "done"
        except BaseException as error:  # kept for the client (error_status logs an unexpected one, once)
            job.failure, job.status = error_status(error), "failed"
        finally:
            job.finished = time.time()
            job.done.set()

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"No job {job_id!r}: it never existed, or it finished more than {self.keep_s:g} s ago "
                                "and was dropped.", param="job_id")
        return job

    def _expire(self) -> None:
        now = time.time()
        finished = sorted((j for j in self._jobs.values() if j.done.is_set()), key=lambda j: j.finished)
        too_many = len(finished) - self.max_kept
        for i, job in enumerate(finished):
            if i < too_many or now - job.finished > self.keep_s:
                del self._jobs[job.id]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
