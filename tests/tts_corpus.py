"""A RAVDESS-layout corpus of espeak-ng speech: real speech this project did not synthesise.

The demo corpus (``ser_ray.corpus.demo_corpus``) is made by our own source-filter code, so a model
that learns its quirks could look better than it is. This corpus comes from a different
synthesiser (espeak-ng, a formant synthesiser with its own phonemes, voices and intonation):

- 24 "actors": espeak-ng voice variants (odd = male variants, even = female variants, as in
  RAVDESS) in six English accents, each with its own pitch/speed offset;
- 8 emotions x 2 intensities x 2 statements x 2 repetitions (neutral: normal intensity only),
  60 clips per actor, as in RAVDESS; an emotion is a prosody setting (pitch, pitch range,
  speed, loudness, word gap), scaled up for strong intensity; repetitions get a small
  deterministic jitter so they are near-duplicates, not copies;
- 48 kHz 16-bit mono WAV with silence and a faint noise floor at both ends.

It needs the ``espeak-ng`` program (Debian/Ubuntu: ``apt-get install espeak-ng``). Used by
tests and benchmarks only::

    python -m tts_corpus --out /tmp/tts_corpus          # 24 x 60 clips
    python -m tts_corpus --out /tmp/tts_small --actors 1-6
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ser_ray.corpus.ravdess import RavdessName

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 48_000
STATEMENTS = {1: "Kids are talking by the door.", 2: "Dogs are sitting by the door."}
MALE_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "adam", "Andy", "david", "john"]
FEMALE_VARIANTS = ["f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "aunty"]
FEMALE_VARIANTS += ["belinda", "linda", "steph"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc"]


@dataclass(frozen=True)
class Prosody:
    """Relative prosody of an emotion at normal intensity (0 = the voice's own)."""

    pitch: float  # added to espeak's pitch (0..99 scale, voice default 50)
    range_pct: float  # change of the pitch range, percent
    speed_pct: float  # change of the speaking rate, percent
    volume_pct: float  # change of the amplitude, percent
    word_gap: int  # extra pause between words, espeak units of 10 ms


EMOTIONS = {
    1: Prosody(pitch=0, range_pct=0, speed_pct=0, volume_pct=0, word_gap=0),  # neutral
    2: Prosody(pitch=-4, range_pct=-30, speed_pct=-15, volume_pct=-25, word_gap=1),  # calm
    3: Prosody(pitch=10, range_pct=45, speed_pct=10, volume_pct=10, word_gap=0),  # happy
    4: Prosody(pitch=-10, range_pct=-50, speed_pct=-25, volume_pct=-35, word_gap=2),  # sad
    5: Prosody(pitch=6, range_pct=70, speed_pct=12, volume_pct=45, word_gap=0),  # angry
    6: Prosody(pitch=18, range_pct=15, speed_pct=22, volume_pct=-10, word_gap=0),  # fearful
    7: Prosody(pitch=-7, range_pct=25, speed_pct=-20, volume_pct=5, word_gap=1),  # disgust
    8: Prosody(pitch=20, range_pct=90, speed_pct=0, volume_pct=20, word_gap=0),  # surprised
}
STRONG_SCALE = 1.6  # intensity 02 exaggerates the emotion's prosody


def clip_names(actors: list[int]) -> list[RavdessName]:
    """The 60 RAVDESS speech clip names of each actor (neutral has normal intensity only)."""
    names = []
    for actor in actors:
        for emotion in EMOTIONS:
            for intensity in (1,) if emotion == 1 else (1, 2):
                for statement in STATEMENTS:
                    for repetition in (1, 2):
                        names.append(
                            RavdessName(3, 1, emotion, intensity, statement, repetition, actor)
                        )
    return names


def _rng(*keys: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def espeak_command(name: RavdessName, seed: int = 0) -> list[str]:
    """The espeak-ng command line that speaks clip ``name`` (SSML text, WAV to stdout)."""
    variants = MALE_VARIANTS if name.actor % 2 else FEMALE_VARIANTS
    voice = f"{ACCENTS[(name.actor - 1) // 2 % len(ACCENTS)]}+{variants[(name.actor - 1) // 2]}"
    speaker = _rng("actor", name.actor, seed)
    base_pitch = 50 + speaker.uniform(-8, 8)
    base_speed = 165 * (1 + speaker.uniform(-0.1, 0.1))
    scale = STRONG_SCALE if name.intensity == 2 else 1.0
    jitter = _rng("clip", name.file_name, seed).uniform(-0.03, 0.03, size=2)
    p = EMOTIONS[name.emotion_code]
    pitch = int(np.clip(base_pitch + scale * p.pitch + 50 * jitter[0], 0, 99))
    speed = int(base_speed * (1 + scale * p.speed_pct / 100) * (1 + jitter[1]))
    amplitude = int(np.clip(100 * (1 + scale * p.volume_pct / 100), 10, 200))
    range_pct = int(scale * p.range_pct)
    text = STATEMENTS[name.statement]
    ssml = f'<speak><prosody range="{range_pct:+d}%">{text}</prosody></speak>'
    gap = int(scale * p.word_gap)
    flags = {"-v": voice, "-p": pitch, "-s": speed, "-a": amplitude, "-g": gap}
    return ["espeak-ng", "-m", "--stdout", *(str(x) for kv in flags.items() for x in kv), ssml]


def render(name: RavdessName, seed: int = 0) -> np.ndarray:
    """Clip ``name`` as float32 samples at 48 kHz, with 0.3–0.8 s of near-silence each side."""
    result = subprocess.run(espeak_command(name, seed), capture_output=True, check=True)
    speech, sr_hz = sf.read(io.BytesIO(result.stdout), dtype="float32")
    speech = soxr.resample(speech, sr_hz, SAMPLE_RATE_HZ)
    rng = _rng("pad", name.file_name, seed)
    pads = [np.zeros(int(rng.uniform(0.3, 0.8) * SAMPLE_RATE_HZ), np.float32) for _ in "ab"]
    clip = np.concatenate([pads[0], speech, pads[1]])
    clip += rng.normal(0, 3e-4, clip.shape).astype(np.float32)
    return np.clip(clip, -1.0, 1.0)


def write_tts_corpus(
    out_dir: str | Path, actors: list[int] | None = None, seed: int = 0, threads: int = 4
) -> list[Path]:
    """Write the corpus as ``out_dir/Actor_XX/03-01-....wav``; existing files are kept."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng not found: install it (apt-get install espeak-ng)")
    out = Path(out_dir)
    names = clip_names(actors or list(range(1, 25)))
    partial = out / ".partial"  # files are written here, then renamed into place
    partial.mkdir(parents=True, exist_ok=True)

    def write(name: RavdessName) -> Path:
        path = out / f"Actor_{name.actor:02d}" / name.file_name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial / name.file_name
            sf.write(tmp, render(name, seed), SAMPLE_RATE_HZ, subtype="PCM_16")
            tmp.rename(path)
        return path

    with ThreadPoolExecutor(threads) as pool:
        paths = list(pool.map(write, names))
    partial.rmdir()
    log.info("espeak-ng corpus: %d clips in %s", len(paths), out)
    return paths


def _actor_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write Actor_XX/*.wav into")
    parser.add_argument("--actors", default="1-24", help="actor range, e.g. 1-24 or 1-6")
    parser.add_argument("--seed", type=int, default=0, help="jitter and speaker-offset seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tts_corpus(args.out, _actor_range(args.actors), args.seed)


if __name__ == "__main__":
    main()
