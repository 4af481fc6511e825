"""Streaming ingest: the same batches as in memory with a window >= the split, at most one
window of clips held, and the Ray Data datasets giving exactly the fold's rows."""

from __future__ import annotations

import weakref

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_train_loop import CLASSES, LABELS, synthetic_table, tiny_config

from ser_ray.models.ssl import demo_feature_extractor
from ser_ray.training.clip_data import (
    batches_per_epoch,
    collate,
    collated_batches,
    count_split,
    length_grouped_batches,
    merge_tables,
    read_split,
    table_from_arrow,
)
from ser_ray.training.clip_stream import ClipStream, chain_streams
from ser_ray.training.config import build_model
from ser_ray.training.engine import seed_everything
from ser_ray.training.finetune import evaluate, run_training

FE = demo_feature_extractor()
CPU = torch.device("cpu")


def to_clips(rows: pa.Table):
    return table_from_arrow(rows, "waveform", LABELS, FE)


def stream_of(rows: pa.Table, window_clips: int, rows_per_read: int = 3) -> ClipStream:
    """A stream of ``rows`` in a scrambled (but fixed) order, ``rows_per_read`` at a time."""
    scrambled = rows.take(np.random.default_rng(7).permutation(rows.num_rows))

    def open_tables():
        return (scrambled.slice(i, rows_per_read) for i in range(0, rows.num_rows, rows_per_read))

    return ClipStream(open_tables, to_clips, rows.num_rows, window_clips)


def _same_batch(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world_size", [1, 2])
def test_window_covering_the_split_gives_the_in_memory_batches(world_size):
    rows = synthetic_table(5, seed=3)  # 40 clips
    table = to_clips(rows)
    stream = stream_of(rows, window_clips=64)
    for epoch in (0, 1):
        for rank in range(world_size):
            kw = dict(seed=11, epoch=epoch, rank=rank, world_size=world_size, group_factor=2)
            expected = [collate(table, b) for b in length_grouped_batches(table.lengths, 4, **kw)]
            streamed = list(collated_batches(stream, 4, **kw))
            assert (
                len(streamed)
                == len(expected)
                == batches_per_epoch(stream, 4, world_size=world_size, group_factor=2)
            )
            assert all(_same_batch(a, b) for a, b in zip(streamed, expected, strict=True))


def test_small_windows_hold_at_most_one_window_and_see_every_clip_once():
    rows = synthetic_table(5, seed=3)  # 40 clips
    alive, peak = [0], [0]  # clips whose window is still referenced; the most at once

    def release(n: int) -> None:
        alive[0] -= n

    def counted(rows: pa.Table):
        clips = to_clips(rows)
        alive[0] += len(clips)
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(clips, release, len(clips))
        return clips

    stream = ClipStream(stream_of(rows, 9).open_tables, counted, rows.num_rows, window_clips=9)
    seen = []
    for epoch in (0, 1):
        batches = list(collated_batches(stream, 4, seed=0, epoch=epoch, group_factor=1))
        assert len(batches) == batches_per_epoch(stream, 4, group_factor=1)  # 5 windows
        labels = torch.cat([b["labels"] for b in batches])
        assert sorted(labels.tolist()) == sorted(to_clips(rows).labels.tolist())
        seen.append(labels.tolist())
    assert seen[0] != seen[1]  # reshuffled per epoch
    assert peak[0] == 9  # one full window, never two at once


@pytest.mark.slow
def test_stream_and_table_train_and_score_alike():
    """1 epoch, window >= split: identical training metrics, weights and test scores."""
    train_rows, test_rows = synthetic_table(2, seed=1), synthetic_table(1, seed=2)
    cfg = tiny_config(epochs=1)
    runs = []
    for train, test in (
        (to_clips(train_rows), to_clips(test_rows)),
        (stream_of(train_rows, 32), stream_of(test_rows, 32)),
    ):
        seed_everything(cfg.seed)
        model, fe = build_model(cfg, CLASSES)
        outcome = run_training(cfg, model, fe, train, None)
        metrics, probs, scored = evaluate(model, test, batch_size=4, device=CPU, num_classes=8)
        runs.append((outcome.state.history[0], model.state_dict(), metrics, probs, scored))
    (h_mem, w_mem, m_mem, p_mem, s_mem), (h_str, w_str, m_str, p_str, s_str) = runs
    timing = ("train/clips_per_s", "train/epoch_s")
    assert {k: v for k, v in h_mem.items() if k not in timing} == {
        k: v for k, v in h_str.items() if k not in timing
    }
    assert all(torch.equal(w_mem[k], w_str[k]) for k in w_mem)
    assert m_mem == m_str and np.array_equal(p_mem, p_str) and s_mem.paths == s_str.paths


def test_evaluation_over_small_windows_scores_every_clip_in_path_order():
    rows = synthetic_table(2, seed=2)
    cfg = tiny_config()
    seed_everything(0)
    model, _ = build_model(cfg, CLASSES)
    whole = evaluate(model, to_clips(rows), batch_size=4, device=CPU, num_classes=8)
    windowed = evaluate(model, stream_of(rows, 5), batch_size=4, device=CPU, num_classes=8)
    assert windowed[2].paths == whole[2].paths == sorted(whole[2].paths)
    np.testing.assert_allclose(windowed[1], whole[1], atol=1e-6, rtol=0)
    assert windowed[0]["val/uar"] == whole[0]["val/uar"]


def test_chained_streams_are_the_merged_splits():
    fit, val = synthetic_table(1, seed=1), synthetic_table(1, seed=2)
    chained = chain_streams(stream_of(fit, 64), stream_of(val, 64))
    [window] = list(chained.windows())
    merged = merge_tables(to_clips(fit), to_clips(val))
    assert len(chained) == 16 and window.paths == merged.paths
    assert all(np.array_equal(a, b) for a, b in zip(window.inputs, merged.inputs, strict=True))


def test_a_stream_that_changed_under_training_is_an_error():
    rows = synthetic_table(1)
    stream = ClipStream(stream_of(rows, 4).open_tables, to_clips, rows.num_rows + 1, 4)
    with pytest.raises(ValueError, match="gave 8 clips but 9 were expected"):
        list(stream.windows())


def test_fold_datasets_stream_the_rows_read_split_reads(demo_features):
    """The Ray datasets a TorchTrainer gets hold exactly the split's rows and columns, in
    the same order on every pass; a small source's are read at once and held, with the same
    rows in the same order as Ray Data's reads of a large one."""
    from ray.data.dataset import MaterializedDataset

    from ser_ray.distributed.ingest import data_config, fold_datasets, source_dataset, split_columns

    source = demo_features / "features"
    datasets = fold_datasets(source, {"train": [3, 9], "val": []}, "waveform")
    assert set(datasets) == {"train"}
    ds = datasets["train"]
    assert isinstance(ds, MaterializedDataset)  # held: no read task per pass
    lazy = source_dataset(source, split_columns("waveform"), [3, 9], hold=False)
    assert not isinstance(lazy, MaterializedDataset)
    passes = []
    for dataset in (ds, ds, lazy):
        dataset.context.execution_options = data_config()._resolve_execution_options("train")
        batches = dataset.iter_batches(batch_size=16, batch_format="pyarrow")
        passes.append(pa.concat_tables(batches))
    assert passes[0].column_names == split_columns("waveform")
    assert passes[0].equals(passes[1]) and passes[0].equals(passes[2])
    direct = read_split(source, [3, 9], split_columns("waveform"))
    assert passes[0].num_rows == direct.num_rows == count_split(source, [3, 9]) == 32
    key = "path"
    assert sorted(passes[0].column(key).to_pylist()) == sorted(direct.column(key).to_pylist())
