"""Synthetic clip manifests of any size for the scale benchmark (``jobs/benchmark.py scale``).

The demo corpus's generator (:mod:`ser_ray.corpus.demo_corpus`) has RAVDESS's 24 actors; a corpus
of 384 speakers needs more voices. Here speaker ``s`` gets the demo generator's voice of actor
``s`` (pitch by the parity of ``s`` as gender, tract length, breathiness, expressiveness drawn
from its own seed) and the demo's first ``clips_per_speaker`` clips of an actor (8 emotions,
3-5 s), synthesised and written at 16 kHz mono as
``spk<s>/<RAVDESS name>.wav``, listed in ``manifest.csv`` (path, speaker, emotion, gender).
Each corpus is cached in its folder (a marker file names its settings), so sizes are built once.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
from pathlib import Path

import soundfile as sf

from ser_ray.corpus.demo_corpus import clip_specs, map_on_cores, synthesize
from ser_ray.corpus.ravdess import RavdessName

TARGET_SR_HZ = 16_000


def corpus_specs(n_speakers: int, clips_per_speaker: int) -> list[RavdessName]:
    """The clips of every speaker: the demo corpus's clip list of one actor, per speaker.

    >>> specs = corpus_specs(n_speakers=30, clips_per_speaker=8)
    >>> len(specs), specs[-1].actor, len({s.emotion for s in specs})
    (240, 30, 8)
    """
    one_actor = clip_specs(n_actors=1, clips_per_actor=clips_per_speaker)
    return [
        dataclasses.replace(spec, actor=speaker)
        for speaker in range(1, n_speakers + 1)
        for spec in one_actor
    ]


def _relative_path(spec: RavdessName) -> str:
    return f"spk{spec.actor:03d}/{spec.file_name}"


def _write_clip(spec: RavdessName, root: Path, speech_scale: float) -> None:
    """One clip synthesised and written at 16 kHz (16-bit PCM)."""
    y = synthesize(spec, seed=0, speech_scale=speech_scale, sr_hz=TARGET_SR_HZ)
    sf.write(root / _relative_path(spec), y, TARGET_SR_HZ, "PCM_16")


def write_scale_corpus(
    root: str | Path, n_speakers: int, clips_per_speaker: int = 60, speech_scale: float = 1.0
) -> Path:
    """Write (or reuse) the corpus of ``n_speakers`` x ``clips_per_speaker`` clips under
    ``root``; returns its ``manifest.csv``. Clips are synthesised on every core."""
    root = Path(root)
    manifest = root / "manifest.csv"
    stamp = f"speakers={n_speakers} clips={clips_per_speaker} scale={float(speech_scale)} sr=16000"
    marker = root / ".scale_corpus"
    if marker.exists() and marker.read_text() == stamp and manifest.exists():
        return manifest
    specs = corpus_specs(n_speakers, clips_per_speaker)
    for speaker in range(1, n_speakers + 1):
        (root / f"spk{speaker:03d}").mkdir(parents=True, exist_ok=True)
    map_on_cores(functools.partial(_write_clip, root=root, speech_scale=speech_scale), specs)
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "speaker", "emotion", "gender"])
        for spec in specs:
            writer.writerow(
                [_relative_path(spec), f"spk{spec.actor:03d}", spec.emotion, spec.gender]
            )
    marker.write_text(stamp)
    return manifest
