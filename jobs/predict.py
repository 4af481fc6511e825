"""Trained fold models -> softmax probabilities for new audio (CSV).

Give one or more saved fold models (``<run>/fold_<k>/model``, Hugging Face checkpoint
folders); with several, the probabilities are the mean over the models. Audio in any
format libsndfile reads (WAV, FLAC, OGG, MP3), any sample rate, mono or stereo.

Examples:
  python jobs/predict.py --models runs/kfold/wav2vec2/fold_*/model --out runs/predict a.wav b.flac
  python jobs/predict.py --smoke-test --out runs/predict_smoke
Writes OUT/predictions.csv (path, pred_label, n_models, prob_<emotion>...; rows sum to 1),
OUT/rejected.csv (path, reason) and OUT/config.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers

from ser_ray import cli
from ser_ray.predict import predict_files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("audio", nargs="*", help="audio files (paths or URIs) to classify")
    parser.add_argument(
        "--models", nargs="+", default=[], help="saved fold model folders (one or more)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass")
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when present, else cpu)"
    )
    parser.add_argument(
        "--no-amp",
        dest="amp",
        action="store_false",
        help="on CUDA, run in float32 instead of autocast (bf16 where supported, else fp16)",
    )
    parser.add_argument(
        "--out", default="runs/predict", help="output folder of this run (default: %(default)s)"
    )
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny and fast: an untrained demo model on two generated demo clips",
    )
    return parser


def _smoke_inputs(out: Path) -> tuple[list[str], list[str]]:
    """An untrained demo-size model and two demo clips (48 kHz WAV)."""
    from ser_ray.demo_corpus import write_demo_corpus
    from ser_ray.model import load_model, save_model
    from ser_ray.ravdess import class_names

    model, fe = load_model("demo", class_names(), seed=0)
    model_dir = save_model(model, fe, out / "smoke_model")
    corpus = write_demo_corpus(out / "smoke_audio", n_actors=1, clips_per_actor=2, speech_scale=0.3)
    return [str(model_dir)], sorted(str(p) for p in corpus.rglob("*.wav"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models, audio = list(args.models), list(args.audio)
    if args.smoke_test:
        models, audio = _smoke_inputs(out)
    if not models or not audio:
        build_parser().error("give --models and at least one audio file (or --smoke-test)")
    predictions, rejected = predict_files(models, audio, args.batch_size, args.device, args.amp)
    predictions.to_csv(out / "predictions.csv", index=False)
    rejected.to_csv(out / "rejected.csv", index=False)
    cli.save_config(out, {**vars(args), "models": models, "audio": audio})
    print(predictions.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"\n{len(predictions)} clips predicted by {len(models)} model(s), {len(rejected)} "
        f"rejected\n  predictions: {out / 'predictions.csv'}\n  rejected:    {out / 'rejected.csv'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
