"""Clips streamed window by window, so that a worker's memory does not grow with its split.

A :class:`ClipStream` re-reads its split on every pass (an epoch, an evaluation) from a source
of Arrow tables in a fixed order (in training: a Ray Data shard, see
:mod:`ser_ray.distributed.ingest`) and hands out the clips one *window* at a time: the next
``window_clips`` rows, turned into a :class:`~ser_ray.training.clip_data.ClipArrays` (sorted by
path) by ``to_clips`` (pre-training: :class:`~ser_ray.features.unlabeled.UnlabeledClips`).
Only the window being used is kept: the stream drops its rows before it hands a window out, and
:func:`ser_ray.training.clip_data.window_batches` drops a window before it asks for the next, so a
worker holds at most ``window_clips`` clips plus the one source table being cut.

With ``window_clips`` at least the split's size there is one window holding every clip in
path order, which is exactly the in-memory :class:`~ser_ray.training.clip_data.ClipArrays`: same
batches, same order, same metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import pyarrow as pa

WindowT = TypeVar("WindowT")


@dataclasses.dataclass
class ClipStream(Generic[WindowT]):
    """A split read window by window; re-iterable (each :meth:`windows` call is a new pass).

    ``open_tables()`` starts a pass and yields Arrow tables of rows, always in the same order;
    ``to_clips`` turns a window's rows into clips; ``num_clips`` is the split's size (known
    before reading: it sets the number of steps of an epoch).
    """

    open_tables: Callable[[], Iterable[pa.Table]]
    to_clips: Callable[[pa.Table], WindowT]
    num_clips: int
    window_clips: int

    def __post_init__(self) -> None:
        if self.window_clips < 1:
            raise ValueError(f"window_clips must be >= 1, got {self.window_clips}")

    def __len__(self) -> int:
        return self.num_clips

    def windows(self) -> Iterator[WindowT]:
        """The clips of one pass, ``window_clips`` at a time (the last window may be smaller)."""
        pending: list[pa.Table] = []
        held = 0
        seen = 0
        for table in self.open_tables():
            seen += table.num_rows
            while table.num_rows:
                take = min(self.window_clips - held, table.num_rows)
                pending.append(table.slice(0, take))
                held += take
                table = table.slice(take)
                if held == self.window_clips:
                    held = 0
                    yield self._flush(pending)
        if held:
            yield self._flush(pending)
        if seen != self.num_clips:
            raise ValueError(
                f"the stream gave {seen} clips but {self.num_clips} were expected: the source "
                "changed while training; re-run so the clip counts are taken again"
            )

    def _flush(self, pending: list[pa.Table]) -> WindowT:
        """The window of the ``pending`` rows; empties ``pending`` so the rows are not kept."""
        rows = pa.concat_tables(pending)
        pending.clear()
        return self.to_clips(rows)


def chain_streams(first: ClipStream[WindowT], second: ClipStream[WindowT]) -> ClipStream[WindowT]:
    """One stream of both splits' clips (``first``'s rows, then ``second``'s), windowed as
    ``first``. With a window covering both, it is the two splits merged in path order."""
    return ClipStream(
        open_tables=lambda: itertools.chain(first.open_tables(), second.open_tables()),
        to_clips=first.to_clips,
        num_clips=first.num_clips + second.num_clips,
        window_clips=first.window_clips,
    )
