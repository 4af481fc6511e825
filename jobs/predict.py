"""Trained fold models -> softmax probabilities for new audio (CSV).

Give one or more saved fold models: wav2vec2 (``--models <run>/wav2vec2/fold_<k>/best_model``,
Hugging Face checkpoint folders) or SVM (``--svm-models <run>/svm_models/<variant>/fold_*.joblib``);
with several, the probabilities are the mean over the models. Audio in any format libsndfile
reads (WAV, FLAC, OGG, MP3), any sample rate, mono or stereo.

A speaker-normalised model (``svm+spknorm``, ``wav2vec2+probe+spknorm``) normalises each
clip over its speaker's clips, so it needs the speaker of every clip (``--speaker-of CSV``
with columns path,speaker, or ``--one-speaker`` when all given files are one speaker) and two
clips per speaker at least; a clip without a speaker, or a speaker with a single clip, is
refused.

Examples:
  python jobs/predict.py --models runs/kfold/wav2vec2/fold_*/best_model --out runs/predict \
      a.wav b.flac
  python jobs/predict.py --svm-models runs/kfold/svm_models/svm+spknorm/fold_*.joblib \
      --one-speaker --out runs/predict_spk me_1.wav me_2.wav me_3.wav
  python jobs/predict.py --smoke-test --out runs/predict_smoke
  python jobs/predict.py --svm-models 's3://bucket/kfold/svm_models/svm/fold_*.joblib' \
      --out s3://bucket/predict a.wav b.wav
Writes OUT/predictions.csv (path, pred_label, n_models, prob_<emotion>...; rows sum to 1),
OUT/rejected.csv (path, reason) and OUT/config.json. Models and OUT may be URIs (s3://, gs://):
a quoted URI's wildcards are matched against what the bucket holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ser_ray import cli
from ser_ray.common import config_file, storage
from ser_ray.distributed import console
from ser_ray.features.speaker_norm import SpeakerNormError
from ser_ray.predict import expand_locations, predict_files, predict_files_svm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("audio", nargs="*", help="audio files (paths or URIs) to classify")
    parser.add_argument(
        "--models", nargs="+", default=[], help="saved fold model folders (one or more)"
    )
    parser.add_argument(
        "--svm-models", nargs="+", default=[], help="saved SVM fold models (fold_<k>.joblib)"
    )
    speakers = parser.add_mutually_exclusive_group()
    speakers.add_argument(
        "--speaker-of",
        help="CSV with columns path,speaker: the speaker of each audio file (for "
        "speaker-normalised models); paths match as given or by file name",
    )
    speakers.add_argument(
        "--one-speaker", action="store_true", help="all given audio files are one speaker"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass")
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when present, else cpu)"
    )
    parser.add_argument(
        "--no-amp",
        dest="amp",
        action="store_const",
        const="off",
        default="auto",
        help="on CUDA, run in float32 instead of autocast (bf16 where supported, else fp16)",
    )
    parser.add_argument(
        "--out",
        default="runs/predict",
        help="output folder or URI of this run (default: %(default)s)",
    )
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny and fast: an untrained demo model on two generated demo clips",
    )
    return parser


def _smoke_inputs(out: Path) -> tuple[list[str], list[str]]:
    """An untrained demo-size model and two demo clips (48 kHz WAV), in the local folder
    ``out``."""
    from ser_ray.corpus.demo_corpus import write_demo_corpus
    from ser_ray.corpus.ravdess import class_names
    from ser_ray.models.ssl import RANDOM_DEMO_MODEL, load_model, save_model

    model, fe = load_model(RANDOM_DEMO_MODEL, class_names(), seed=0)
    model_dir = save_model(model, fe, out / "smoke_model")
    corpus = write_demo_corpus(out / "smoke_audio", n_actors=1, clips_per_actor=2, speech_scale=0.3)
    return [str(model_dir)], sorted(str(p) for p in corpus.rglob("*.wav"))


def _speakers(args: argparse.Namespace, audio: list[str]) -> dict[str, str] | None:
    """path -> speaker from --one-speaker or --speaker-of (None: no grouping given)."""
    if args.one_speaker:
        return dict.fromkeys(audio, "speaker")
    if not args.speaker_of:
        return None
    table = pd.read_csv(args.speaker_of, dtype=str)
    if not {"path", "speaker"} <= set(table.columns):
        build_parser().error(f"{args.speaker_of}: needs columns path,speaker; has {list(table)}")
    given = dict(zip(table["path"], table["speaker"], strict=True))
    by_name = {Path(p).name: s for p, s in given.items()}
    return {a: given.get(a, by_name.get(Path(a).name)) for a in audio}


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    console.quiet_transformers()
    storage.make_dirs(args.out)
    if args.smoke_test:  # its model and clips in OUT (a URI's: made here, uploaded at the end)
        with storage.staged(args.out) as folder:
            models, audio = _smoke_inputs(folder)
            return _predict(args, models, list(args.svm_models), audio)
    try:
        models, svm_models = expand_locations(args.models), expand_locations(args.svm_models)
    except FileNotFoundError as err:
        build_parser().error(str(err))
    return _predict(args, models, svm_models, list(args.audio))


def _predict(
    args: argparse.Namespace, models: list[str], svm_models: list[str], audio: list[str]
) -> int:
    """Predict ``audio`` with the fold models (one kind), write OUT's files, report."""
    if bool(models) == bool(svm_models) or not audio:
        build_parser().error(
            "give --models or --svm-models (one kind) and at least one audio file (or --smoke-test)"
        )
    try:
        if models:
            predictions, rejected = predict_files(
                models, audio, args.batch_size, args.device, args.amp, _speakers(args, audio)
            )
        else:
            predictions, rejected = predict_files_svm(svm_models, audio, _speakers(args, audio))
            models = svm_models
    except SpeakerNormError as err:
        build_parser().error(str(err))
    predictions_csv = storage.join(args.out, "predictions.csv")
    rejected_csv = storage.join(args.out, "rejected.csv")
    storage.write_text(predictions_csv, predictions.to_csv(index=False))
    storage.write_text(rejected_csv, rejected.to_csv(index=False))
    config_file.save_config(args.out, {**vars(args), "models": models, "audio": audio})
    print(predictions.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"\n{len(predictions)} clips predicted by {len(models)} model(s), {len(rejected)} "
        f"rejected\n  predictions: {predictions_csv}\n  rejected:    {rejected_csv}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
