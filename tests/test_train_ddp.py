"""Two DDP ranks on CPU (gloo), run_training itself in two processes: training, one early-stop
decision for every rank, per-rank seeds and RNG files, bit-exact resume.

Ray Train does the same wiring (process group, DDP wrap) around the same loop; these tests
drive it with ``torch.multiprocessing`` so they stay small and fast.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_loop import CLASSES, LABELS, synthetic_table, tiny_config
from torch.nn.parallel import DistributedDataParallel

from ser_ray.models.ssl import demo_feature_extractor
from ser_ray.training import finetune as train_loop
from ser_ray.training.clip_data import table_from_arrow
from ser_ray.training.config import build_model
from ser_ray.training.engine import seed_everything

WORLD_SIZE = 2
#: Validation UA each rank would see per epoch if ranks decided on their own figures: with
#: patience 1, rank 0 stops after epoch 3 (best 2) and rank 1 after epoch 2 (best 1).
UAR_BY_RANK = {0: [0.5, 0.6, 0.4, 0.3], 1: [0.5, 0.4, 0.6, 0.7]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, settings: dict) -> None:
    """One DDP rank: train with run_training, save what the test compares."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout: ranks that disagree fail the test instead of hanging it
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=45)
    )
    try:
        out_dir = Path(out)
        if settings["fake_uar"]:  # rank-dependent validation figures, in this process only
            real_evaluate = train_loop.evaluate

            def evaluate(model, table, **kw):
                metrics, probs, scored = real_evaluate(model, table, **kw)
                metrics["val/uar"] = UAR_BY_RANK[rank][len(seen)]
                seen.append(metrics["val/uar"])
                return metrics, probs, scored

            seen: list[float] = []
            train_loop.evaluate = evaluate
        cfg = tiny_config(
            epochs=settings["epochs"],
            early_stopping_patience=settings["patience"],
            head_dropout=0.1,
            spec_augment=True,
            mask_time_prob=0.3,
            encoder_dropout=0.1,
            warmup_frac=0.2,
            decay_start_frac=0.5,
        )
        fe = demo_feature_extractor()
        train = table_from_arrow(synthetic_table(2, seed=1), "waveform", LABELS, fe)
        val = table_from_arrow(synthetic_table(1, seed=2), "waveform", LABELS, fe)
        seed_everything(cfg.seed, rank)
        model, fe = build_model(cfg, CLASSES)
        resume = settings.get("resume_from")
        if resume:
            torch.manual_seed(1000 + rank)  # a fresh process: the checkpoint must restore RNGs

        def on_epoch_end(metrics, write):
            write(out_dir / f"ckpt{metrics['epoch']}")

        outcome = train_loop.run_training(
            cfg,
            model,
            fe,
            train,
            val,
            rank=rank,
            world_size=WORLD_SIZE,
            wrap_model=lambda m: DistributedDataParallel(m, find_unused_parameters=True),
            resume_from=resume,
            on_epoch_end=on_epoch_end,
        )
        state = outcome.state
        (out_dir / f"state_rank{rank}.json").write_text(
            json.dumps(
                {
                    "epochs": [h["epoch"] for h in state.history],
                    "best_epoch": state.best_epoch,
                    "stopped_early": state.stopped_early,
                    "losses": [h["train/loss"] for h in state.history],
                }
            )
        )
        torch.save(model.state_dict(), out_dir / f"weights_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: freeing the DDP reducer joins gloo's worker thread while
    # holding the GIL, and that thread may wait for the GIL to free a finished broadcast
    # (a fresh-clone CI run hung here for good). Everything the test reads is written above.
    os._exit(0)


def _run(out: Path, **settings) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(_free_port(), str(out), settings), nprocs=WORLD_SIZE, join=True)
    return {r: json.loads((out / f"state_rank{r}.json").read_text()) for r in range(WORLD_SIZE)}


@pytest.mark.slow
def test_rank0_decides_best_epoch_and_early_stop(tmp_path):
    states = _run(tmp_path, epochs=4, patience=1, fake_uar=True)
    # rank 0's figures decide for both: stop after epoch 3, best epoch 2
    for rank in range(WORLD_SIZE):
        assert states[rank]["epochs"] == [1, 2, 3], rank
        assert states[rank]["best_epoch"] == 2 and states[rank]["stopped_early"]
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in range(WORLD_SIZE))
    for name, value in w0.items():  # the same best-epoch weights on both ranks
        assert torch.equal(value, w1[name]), name


@pytest.mark.slow
def test_per_rank_rng_and_bit_exact_resume(tmp_path):
    full = _run(tmp_path / "full", epochs=3, patience=None, fake_uar=False)
    assert full[0]["epochs"] == full[1]["epochs"] == [1, 2, 3]
    assert all(loss == loss for loss in full[0]["losses"])  # trained: finite losses
    ckpt = tmp_path / "full" / "ckpt1"
    rng = [torch.load(ckpt / f"rng_rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])  # per-rank seeds and RNG files
    resumed = _run(tmp_path / "resumed", epochs=3, patience=None, fake_uar=False,
                   resume_from=str(ckpt))  # fmt: skip
    assert resumed[0]["losses"] == full[0]["losses"]
    for rank in range(WORLD_SIZE):
        assert resumed[rank]["epochs"] == [1, 2, 3]
        # bit-exact from the checkpoint on (the history up to it is rank 0's, as reported)
        assert resumed[rank]["losses"][1:] == full[rank]["losses"][1:], rank
        a = torch.load(tmp_path / "full" / f"weights_rank{rank}.pt")
        b = torch.load(tmp_path / "resumed" / f"weights_rank{rank}.pt")
        for name, value in a.items():
            assert torch.equal(value, b[name]), (rank, name)
