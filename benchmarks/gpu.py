"""Benchmark `gpu`: six wav2vec2 folds sharing one GPU, per AMP precision (needs CUDA).

For each precision (``--amp``, default bf16 and fp16) it runs the main job
(``jobs/kfold.py --variants wav2vec2``) on the full demo corpus with a base-size wav2vec2
(randomly initialised, saved with ``save_pretrained``: the hub weights are not needed for a
speed figure) and every fold asking for ``--gpus-per-fold`` of the GPU, so all six train at
once. Figures: wall time of the job, training clips/s per fold (last epoch, from each fold's
history) and in total, and the peak GPU memory of each training process (``nvidia-smi``).
Beside them, one training step of the same model in this process (frozen CNN, AdamW, a batch
of ``--batch-size`` clips of ``--seconds`` seconds): ``torch.cuda.max_memory_allocated`` next
to the estimate of :mod:`ser_ray.training.memory` (SDPA's fused attention on CUDA).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

FOLDS = 6


def add_gpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fold")
    parser.add_argument(
        "--gpus-per-fold",
        type=float,
        default=round(1 / FOLDS, 3),
        help="GPU share of each fold (default: six folds on one GPU)",
    )
    parser.add_argument("--amp", default="bf16,fp16", help="precisions to compare")
    parser.add_argument("--model", default="base", help="'base' (random init), 'demo' or a path")
    parser.add_argument("--batch-size", type=int, default=8, help="clips in the measured step")
    parser.add_argument("--seconds", type=float, default=6.0, help="clip length of that step")


def step_memory(model_dir: str, amp: str, batch_size: int, samples: int) -> tuple[int, int]:
    """(measured, estimated) peak bytes of one AdamW step of ``model_dir`` on CUDA with the
    CNN frozen, ``batch_size`` clips of ``samples`` samples, autocast ``amp`` (or float32)."""
    import torch
    from transformers import Wav2Vec2ForSequenceClassification

    from ser_ray.training.memory import estimate_for_model

    torch.cuda.empty_cache()
    model = Wav2Vec2ForSequenceClassification.from_pretrained(model_dir, num_labels=8).cuda()
    model.freeze_feature_encoder()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    inputs = torch.randn(batch_size, samples, device="cuda")
    labels = torch.zeros(batch_size, dtype=torch.long, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() - sum(
        p.numel() * p.element_size() for p in model.parameters()
    )  # the input batch and CUDA's own workspaces, not the model's
    for _ in range(2):  # the second step has AdamW's state from the first
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() - base
    estimate = estimate_for_model(
        model, batch_size, samples, amp=dtype is not None, fused_attention=True
    )
    del model, optimizer
    return measured, estimate.total


def base_size_model(folder: Path) -> Path:
    """A randomly initialised wav2vec2-base (95M parameters) as a local checkpoint."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    if not (folder / "config.json").exists():
        Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(folder)
        Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=True).save_pretrained(
            folder
        )
    return folder


def _gpu_memory_mb_by_pid() -> dict[int, float]:
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    rows = subprocess.run(query, capture_output=True, text=True, check=True).stdout.splitlines()
    return {int(pid): float(mb) for pid, mb in (row.split(",") for row in rows if row.strip())}


def _run_kfold(command: list[str]) -> tuple[float, dict[int, float]]:
    """Run the job; (wall seconds, peak GPU memory in MB of each process that used the GPU)."""
    peaks: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid, mb in _gpu_memory_mb_by_pid().items():
                peaks[pid] = max(peaks.get(pid, 0.0), mb)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if result.returncode:
        raise RuntimeError(f"kfold failed:\n{result.stderr[-3000:]}")
    return seconds, peaks


def run_gpu_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmark gpu needs a CUDA GPU; this machine has none")
    out = Path(args.out).resolve() / "gpu"
    model = str(base_size_model(out / "wav2vec2_base")) if args.model == "base" else args.model
    job = Path(__file__).resolve().parents[2] / "jobs" / "kfold.py"
    figures: dict[str, Any] = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "epochs": args.epochs,
        "gpus_per_fold": args.gpus_per_fold,
    }
    for amp in [a.strip() for a in args.amp.split(",") if a.strip()]:
        run_dir = out / f"kfold_{amp}"
        params = out / f"params_{amp}.json"
        params.write_text(json.dumps({"params": {"amp": amp}}))
        command = [sys.executable, str(job), "--variants", "wav2vec2", "--model", model]
        command += ["--epochs", str(args.epochs), "--gpus-per-fold", str(args.gpus_per_fold)]
        command += ["--params", str(params), "--out", str(run_dir)]
        seconds, peaks = _run_kfold(command)
        per_fold = []
        for fold in range(1, FOLDS + 1):
            info = json.loads((run_dir / "wav2vec2" / f"fold_{fold}" / "result.json").read_text())
            per_fold.append(info["history"][-1]["train/clips_per_s"])
        if args.model != "demo":  # the demo encoder exists only inside the job's run
            measured, estimated = step_memory(
                model, amp, args.batch_size, int(args.seconds * 16_000)
            )
            figures[f"{amp}_step_peak_mb_measured"] = measured / 2**20
            figures[f"{amp}_step_peak_mb_estimated"] = estimated / 2**20
        figures.update(
            {
                f"{amp}_kfold_wall_s": seconds,
                f"{amp}_clips_per_s_per_fold": [round(v, 1) for v in per_fold],
                f"{amp}_clips_per_s_total": sum(per_fold),
                f"{amp}_gpu_memory_mb_per_process": sorted(peaks.values(), reverse=True),
            }
        )
    return figures
