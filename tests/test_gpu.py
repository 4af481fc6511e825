"""The CUDA path: AMP training steps and six folds sharing one GPU. Skipped without CUDA
(development and CI machines have none); run it on a GPU machine with
``pytest tests/test_gpu.py``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ser_ray.corpus.ravdess import class_names
from ser_ray.models.precision import resolve_amp
from ser_ray.models.ssl import RANDOM_DEMO_MODEL, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_training_step_on_cuda(amp, dtype):
    device = torch.device("cuda")
    assert resolve_amp(amp, device) == dtype
    model, _ = load_model(RANDOM_DEMO_MODEL, class_names(), seed=0)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    waveforms = torch.randn(4, 16_000, device=device)
    labels = torch.tensor([0, 1, 2, 3], device=device)
    with torch.autocast("cuda", dtype=dtype):
        logits = model(input_values=waveforms).logits
    assert logits.dtype == dtype
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.isfinite(loss)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_six_folds_share_one_gpu(tmp_path):
    out = tmp_path / "kfold"
    command = [sys.executable, str(ROOT / "jobs" / "kfold.py"), "--smoke-test"]
    command += ["--variants", "wav2vec2", "--gpus-per-fold", "0.16", "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=1200)
    summary = json.loads((out / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [1, 2, 3, 4, 5, 6]
    for fold in range(1, 7):
        info = json.loads((out / "wav2vec2" / f"fold_{fold}" / "result.json").read_text())
        assert info["history"][-1]["train/clips_per_s"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["kfold"]["gpus_per_fold"] == 0.16
