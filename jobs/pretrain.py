"""Self-supervised wav2vec 2.0 pre-training (contrastive + diversity loss) on Ray Train.

Examples:
  python jobs/pretrain.py --out runs/pretrain                      # demo config, demo pool
  python jobs/pretrain.py --data-dir ~/audio --config my_config.json   # from scratch, any audio
  python jobs/pretrain.py --data-dir runs/features/features --model runs/pretrain/model --epochs 2
  python jobs/kfold.py --model runs/pretrain/model                 # fine-tune the result

--data-dir takes a folder of audio files (any names, WAV/FLAC/OGG/MP3, decoded to 16 kHz into
OUT/pool first) or a Parquet folder with path + waveform columns (jobs/prepare.py's features:
their labels are never read). The output OUT/model is a Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from ser_ray import cli
from ser_ray.common import config_file, storage
from ser_ray.distributed.pretrain_trainer import fit_pretraining
from ser_ray.models.ssl import RANDOM_DEMO_MODEL
from ser_ray.training.pretrain import PretrainConfig

#: The PretrainConfig fields the job takes as flags (--model/--config pick ``model``).
PRETRAIN_FLAGS = (
    "epochs", "batch_size", "lr", "crop_s", "mask_prob", "mask_length", "window_clips",
    "num_negatives", "grad_accum_steps", "freeze_feature_encoder", "seed",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Flags of the pool, the start (--model or --config), PretrainConfig's fields with their
    help (:func:`ser_ray.cli.add_dataclass_args`), Ray Train and the shared ones."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir", help="audio folder or Parquet pool (default: the package's demo pool)"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--model", help="checkpoint folder or hub id to continue from")
    start.add_argument(
        "--config", default="demo", help="from scratch: 'demo' (demo-size) or a config.json"
    )
    cli.add_dataclass_args(p, PretrainConfig, only=PRETRAIN_FLAGS)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP when > 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (AMP on CUDA)")
    p.add_argument("--max-failures", type=int, default=2, help="worker restarts before failing")
    cli.add_common_args(p, default_out="runs/pretrain")
    return p


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    cfg = cli.dataclass_from_args(
        args,
        PretrainConfig,
        model=args.model or (RANDOM_DEMO_MODEL if args.config == "demo" else args.config),
        epochs=1 if args.smoke_test else args.epochs,
    )
    out = storage.absolute(args.out)
    cli.init_ray(args.address, args.num_cpus)
    storage.make_dirs(out)
    cli.check_where_files_live(out, args.data_dir)
    pool = _pool(args.data_dir, out, args.smoke_test)
    config_file.save_config(
        out, {"job": "pretrain", "data": str(pool), "pretrain": cfg, **vars(args)}
    )
    model_dir = fit_pretraining(
        pool, out, cfg, num_workers=args.workers, use_gpu=args.use_gpu,
        max_failures=args.max_failures,
    )  # fmt: skip
    tensorboard = storage.join(out, "tensorboard")
    print(f"pre-trained model: {model_dir} (use it as --model); TensorBoard: {tensorboard}")
    return 0


def _pool(data: str | None, out: str, smoke_test: bool) -> str:
    """The pool to pre-train on, in the run location (``OUT/pool``) unless ``data`` is one."""
    from ser_ray.distributed.demo_encoder import DEMO_ENCODER_SIZES
    from ser_ray.features.unlabeled import is_pool, pool_from_audio_folder, write_demo_pool

    if data is not None and ("://" in data or is_pool(data)):
        return data
    location = storage.join(out, "pool")
    with storage.staged(location) as local:  # on a URI: written here, then uploaded
        if data is None:
            size = "smoke" if smoke_test else "full"
            write_demo_pool(local, **DEMO_ENCODER_SIZES[size]["pool"])
        else:
            pool_from_audio_folder(data, local)
    return location


if __name__ == "__main__":
    sys.exit(main())
