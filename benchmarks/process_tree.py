"""Peak memory and Ray worker count of a process tree, sampled in a background thread.

A process's children include everything Ray starts for a local instance (its GCS, raylet and
the ``ray::`` workers the raylet forks), so sampling the driver's tree covers a whole run.
Reading every process's page tables costs CPU (more with more processes): sample often for
short runs, rarely for long ones, and not at all in timed runs.
"""

from __future__ import annotations

import contextlib
import threading


class TreeThread:
    """``with Subclass(pid, interval_s) as sampler: ...``: every ``interval_s`` seconds, in a
    background thread, :meth:`take` gets the processes of ``pid``'s tree (the root first)
    until the block ends or the root does."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid, self.interval_s = pid, interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):  # the root ended
            root = psutil.Process(self.pid)
            while not self._done.is_set():
                self.take([root, *root.children(recursive=True)])
                self._done.wait(self.interval_s)

    def take(self, processes: list) -> None:
        raise NotImplementedError


class TreePeak(TreeThread):
    """``with TreePeak(pid, interval_s) as peak: ...``, then ``peak.rss``, ``peak.pss`` (bytes,
    summed over the tree; PSS counts shared pages such as libraries and Ray's object store
    once) and ``peak.ray_workers`` (most ``ray::`` processes alive at once)."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        super().__init__(pid, interval_s)
        self.rss = self.pss = self.ray_workers = 0

    def take(self, processes: list) -> None:
        import psutil

        rss = pss = workers = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):  # a process that just ended
                info = process.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
                workers += process.name().startswith("ray::")
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        self.ray_workers = max(self.ray_workers, workers)
