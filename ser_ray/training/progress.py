"""Progress lines inside an epoch (no Ray).

An epoch on a corpus of MSP-Podcast's size takes about an hour on one GPU; one line per epoch
then leaves the console silent for that hour. :class:`EpochProgress` is told after every
optimizer step (or evaluated batch) how far the pass is, and hands a line to ``emit`` at most
every ``every_s`` seconds, the first only after ``every_s`` seconds: time-based, so an epoch
shorter than that (every epoch of the demo run) prints nothing more than it did.

>>> ticks = iter([0.0, 30.0, 64.0, 65.0])
>>> lines = []
>>> meter = EpochProgress("epoch 1/8", 8, lines.append, every_s=60, clock=lambda: next(ticks))
>>> meter.update(units=2, clips=16, loss_sum=32.0)  # 30 s in: nothing yet
>>> meter.update(units=2, clips=16, loss_sum=16.0)  # 64 s in
>>> meter.update(clips=8, loss_sum=8.0)  # 65 s in: the last line was 1 s ago
>>> lines
['epoch 1/8: step 4/8 (50%), 0.5 clips/s, loss 1.5, ETA 64 s']
"""

from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``42 s``, ``7.5 min`` or ``1.3 h``: an ETA a reader takes in at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class EpochProgress:
    """Progress of one pass (training steps or validation batches) of ``total`` units.

    ``what`` starts each line (``epoch 3/8`` or ``validation after epoch 3``), ``unit`` names
    the units counted (``step``, ``batch``). ``emit`` is None or ``every_s <= 0``: off.
    The loss shown is the running mean over the clips of the pass so far. The pass's last
    unit gets no line: the epoch's own line follows at once."""

    def __init__(
        self,
        what: str,
        total: int,
        emit: Callable[[str], None] | None,
        *,
        every_s: float,
        unit: str = "step",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.emit = emit if every_s > 0 else None
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock() if self.emit is not None else 0.0
        self.done, self.clips, self.loss_sum = 0, 0, 0.0

    def update(self, *, units: int = 1, clips: int, loss_sum: float | None = None) -> None:
        """``units`` more of ``total`` are done, holding ``clips`` clips whose summed loss
        is ``loss_sum`` (None: no loss shown)."""
        if self.emit is None:
            return
        self.done += units
        self.clips += clips
        if loss_sum is not None:
            self.loss_sum += loss_sum
        now = self.clock()
        if now - self.last < self.every_s or self.done >= self.total:
            return
        self.last = now
        self.emit(self.line(self.done, now - self.start, with_loss=loss_sum is not None))

    def line(self, done: int, elapsed_s: float, *, with_loss: bool) -> str:
        """``epoch 3/8: step 120/480 (25%), 41.2 clips/s, loss 1.23, ETA 9.0 min``."""
        parts = [f"{self.unit} {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%)"]
        parts.append(f"{self.clips / elapsed_s:.3g} clips/s" if elapsed_s > 0 else "")
        if with_loss and self.clips:
            parts.append(f"loss {self.loss_sum / self.clips:.4g}")
        if 0 < done < self.total:
            parts.append(f"ETA {format_duration(elapsed_s * (self.total - done) / done)}")
        return f"{self.what}: " + ", ".join(p for p in parts if p)
