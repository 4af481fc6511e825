"""A deterministic synthetic corpus in RAVDESS layout, made with numpy alone.

Each clip is a short "sentence" of voiced syllables: a glottal-like harmonic source whose
pitch contour follows the emotion's prosody, shaped by the vowel formants of the actor's
vocal tract, with silence at both ends (48 kHz, 16-bit mono, like RAVDESS). Emotions differ in
pitch level and range, tempo, energy, spectral tilt, jitter and breathiness, scaled by the
intensity; actors differ in base pitch (by gender), vocal-tract length, breathiness and in how
expressive they are, and every clip gets its own random variation. So emotion is learnable but
not trivial, and speaker-independent folds matter.

>>> specs = clip_specs(n_actors=2, clips_per_actor=8)
>>> len(specs), sorted({s.emotion_code for s in specs}) == list(range(1, 9))
(16, True)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

from ser_ray.common import storage
from ser_ray.corpus.ravdess import CLIPS_PER_ACTOR, NUM_ACTORS, RavdessName

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 48_000
#: Fewer clips than this are synthesised in this process: a process pool's start (a fresh
#: interpreter per core, numpy and scipy imported) costs more than it saves.
PARALLEL_MIN_CLIPS = 200


@dataclasses.dataclass(frozen=True)
class Prosody:
    """How an emotion departs from a neutral voice (neutral is all ones / zeros)."""

    pitch_scale: float  # mean F0 relative to the speaker's base pitch
    pitch_range_st: float  # F0 excursion within a syllable, semitones
    tempo: float  # syllable rate relative to neutral
    energy_db: float  # level relative to neutral
    tilt: float  # spectral slope of the source (harmonic k has amplitude k**-tilt)
    jitter: float  # relative random F0 perturbation
    breathiness: float  # aspiration noise relative to the voiced source


NEUTRAL = Prosody(1.00, 2.0, 1.00, 0.0, 1.2, 0.005, 0.02)
PROSODY: dict[int, Prosody] = {
    1: NEUTRAL,
    2: Prosody(0.96, 1.4, 0.88, -3.0, 1.45, 0.004, 0.05),  # calm
    3: Prosody(1.18, 5.0, 1.10, 3.0, 1.00, 0.010, 0.02),  # happy
    4: Prosody(0.92, 1.0, 0.75, -5.0, 1.60, 0.012, 0.07),  # sad
    5: Prosody(1.14, 4.0, 1.15, 8.0, 0.70, 0.020, 0.03),  # angry
    6: Prosody(1.32, 3.0, 1.22, 1.0, 1.10, 0.030, 0.06),  # fearful
    7: Prosody(0.90, 2.6, 0.82, 2.0, 1.25, 0.016, 0.04),  # disgust
    8: Prosody(1.38, 7.0, 1.00, 4.0, 0.90, 0.010, 0.02),  # surprised
}
INTENSITY_SCALE = {1: 0.6, 2: 1.0}  # normal intensity departs less from neutral

# Vowel formants (F1, F2, F3) in Hz of an adult male vocal tract.
VOWELS = {
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (270, 2290, 3010),
    "o": (570, 840, 2410),
    "u": (300, 870, 2240),
}
# "Kids are talking by the door" / "Dogs are sitting by the door"
STATEMENT_VOWELS = {1: "iaoiaeo", 2: "oaiiaeo"}


def speech_clip(
    emotion_code: int, intensity: int, statement: int, repetition: int, actor: int
) -> RavdessName:
    """An audio-only speech clip's name fields (modality 03, channel 01)."""
    return RavdessName(3, 1, emotion_code, intensity, statement, repetition, actor)


def clip_specs(
    n_actors: int = NUM_ACTORS, clips_per_actor: int = CLIPS_PER_ACTOR
) -> list[RavdessName]:
    """The clips to make: per actor, the first ``clips_per_actor`` of the 60 RAVDESS clips in
    an order that covers every emotion before repeating one (repetition, statement, intensity,
    emotion)."""
    if not 1 <= n_actors <= NUM_ACTORS:
        raise ValueError(f"n_actors={n_actors}: RAVDESS has actors 1..{NUM_ACTORS}")
    if not 1 <= clips_per_actor <= CLIPS_PER_ACTOR:
        raise ValueError(f"clips_per_actor={clips_per_actor}: must be 1..{CLIPS_PER_ACTOR}")
    per_actor = [
        (rep, stmt, inten, emo)
        for rep in (1, 2)
        for stmt in (1, 2)
        for inten in (1, 2)
        for emo in range(1, 9)
        if not (emo == 1 and inten == 2)
    ][:clips_per_actor]
    return [
        speech_clip(emo, inten, stmt, rep, actor)
        for actor in range(1, n_actors + 1)
        for rep, stmt, inten, emo in per_actor
    ]


@dataclasses.dataclass(frozen=True)
class Voice:
    base_pitch_hz: float
    tract_scale: float  # formant frequencies relative to the male table
    breathiness: float
    expressiveness: float  # how strongly this actor acts the emotions


def actor_voice(actor: int, seed: int) -> Voice:
    rng = np.random.default_rng([seed, actor, 7])
    male = actor % 2 == 1
    return Voice(
        base_pitch_hz=(115.0 if male else 205.0) * float(rng.uniform(0.82, 1.22)),
        tract_scale=(1.0 if male else 1.16) * float(rng.uniform(0.94, 1.06)),
        breathiness=float(rng.uniform(0.0, 0.05)),
        expressiveness=float(rng.uniform(0.6, 1.3)),
    )


def clip_prosody(spec: RavdessName, voice: Voice) -> Prosody:
    """The emotion's prosody, scaled by intensity and the actor's expressiveness."""
    target = PROSODY[spec.emotion_code]
    k = INTENSITY_SCALE[spec.intensity] * voice.expressiveness
    mixed = {
        f.name: getattr(NEUTRAL, f.name) + k * (getattr(target, f.name) - getattr(NEUTRAL, f.name))
        for f in dataclasses.fields(Prosody)
    }
    return Prosody(**mixed)


def _resonate(x: np.ndarray, freq_hz: float, bandwidth_hz: float, sr_hz: int) -> np.ndarray:
    """Second-order resonator (one formant), unit gain at its peak frequency."""
    r = np.exp(-np.pi * bandwidth_hz / sr_hz)
    theta = 2 * np.pi * freq_hz / sr_hz
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1 - r], a, x)


def synthesize(
    spec: RavdessName,
    seed: int = 0,
    speech_scale: float = 1.0,
    vowels: str | None = None,
    sr_hz: int = SAMPLE_RATE_HZ,
) -> np.ndarray:
    """One clip as float32 samples at ``sr_hz`` (48 kHz, as RAVDESS; deterministic in
    ``spec``, ``seed``, ``vowels``, ``sr_hz``).

    ``speech_scale`` stretches syllables and silences (1.0 gives RAVDESS-like 3–5 s clips);
    ``vowels`` (one syllable per letter of :data:`VOWELS`) replaces the statement's sentence.
    ``sr_hz`` 16 kHz makes a clip in a third of the time (large synthetic corpora); the
    harmonics reach 4.8 kHz at any rate.
    """
    sr = sr_hz
    voice = actor_voice(spec.actor, seed)
    pro = clip_prosody(spec, voice)
    rng = np.random.default_rng(
        [seed, spec.actor, spec.emotion_code, spec.intensity, spec.statement, spec.repetition]
    )
    tempo = pro.tempo * rng.uniform(0.92, 1.08)
    pitch = voice.base_pitch_hz * pro.pitch_scale * rng.uniform(0.96, 1.04)
    gain = 0.12 * 10 ** ((pro.energy_db + rng.normal(0, 1.5)) / 20)
    lead_s, tail_s = rng.uniform(0.5, 0.9, size=2) * speech_scale
    pieces = [np.zeros(int(lead_s * sr))]
    vowels = vowels or STATEMENT_VOWELS[spec.statement]
    for i, vowel in enumerate(vowels):
        dur_s = 0.26 * speech_scale / tempo * rng.uniform(0.8, 1.25)
        n = int(dur_s * sr)
        t = np.arange(n) / n
        # Pitch contour: rise-fall per syllable, declination over the sentence, jitter.
        shape = np.sin(np.pi * t) * (1 if i % 2 == 0 else -0.5) - 0.3 * i / len(vowels)
        hop = sr // 200  # jitter changes every 5 ms
        jitter = np.repeat(rng.normal(0, pro.jitter, size=n // hop + 1), hop)[:n]
        f0 = pitch * 2 ** (pro.pitch_range_st * shape / 12) * (1 + jitter)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        n_harm = int(4800 // (pitch * 1.6))
        k = np.arange(1, n_harm + 1)[:, None]
        source = ((k**-pro.tilt) * np.sin(k * phase[None, :])).sum(axis=0)
        source += (pro.breathiness + voice.breathiness) * 4 * rng.standard_normal(n)
        formants = np.array(VOWELS[vowel]) * voice.tract_scale * rng.uniform(0.97, 1.03)
        speech = sum(
            _resonate(source, f, bw, sr) for f, bw in zip(formants, (80, 100, 140), strict=True)
        )
        envelope = np.minimum(1, np.minimum(t, 1 - t) * 8) ** 1.5
        pieces.append(speech * envelope)
        pieces.append(np.zeros(int(rng.uniform(0.02, 0.08) * speech_scale / tempo * sr)))
    pieces.append(np.zeros(int(tail_s * sr)))
    y = np.concatenate(pieces)
    y = gain * y / (np.max(np.abs(y)) + 1e-9)
    y += rng.normal(0, 10 ** (-66 / 20), size=y.size)  # recording noise floor
    return np.clip(y, -1, 1).astype(np.float32)


def write_demo_corpus(
    out_dir: str | Path,
    n_actors: int = NUM_ACTORS,
    clips_per_actor: int = CLIPS_PER_ACTOR,
    seed: int = 0,
    speech_scale: float = 1.0,
) -> Path:
    """Write ``Actor_XX/<ravdess name>.wav`` files (48 kHz, 16-bit PCM, mono) and return the
    folder. Files already there with the same settings are kept (the run is resumable)."""
    root = Path(out_dir)
    stamp = (
        f"n_actors={n_actors} clips_per_actor={clips_per_actor} seed={seed} scale={speech_scale}"
    )
    marker = root / ".demo_corpus"
    if marker.exists() and marker.read_text() == stamp:
        return root
    with storage.node_lock(root / ".demo_corpus.lock"):  # a second writer waits, then reads
        if marker.exists() and marker.read_text() == stamp:
            return root
        specs = clip_specs(n_actors, clips_per_actor)
        for actor in sorted({spec.actor for spec in specs}):
            (root / f"Actor_{actor:02d}").mkdir(parents=True, exist_ok=True)
        write = functools.partial(_write_clip, root=root, seed=seed, speech_scale=speech_scale)
        map_on_cores(write, specs)
        marker.write_text(stamp)
    log.info("demo corpus: %d clips of %d actors in %s", len(specs), n_actors, root)
    return root


#: Seed of the unlabeled pool's voices: other speakers than any demo corpus (seed 0).
POOL_SEED = 1_000


def unlabeled_pool_clips(
    n_speakers: int, clips_per_speaker: int, seed: int = POOL_SEED, speech_scale: float = 0.7
) -> list[tuple[str, np.ndarray]]:
    """(name, 48 kHz samples) of unlabeled clips for self-supervised pre-training.

    Disjoint from the demo corpus: other voices (drawn with ``seed``, not the corpus's seed)
    and other sentences (random vowel sequences of 4–9 syllables, never the two RAVDESS
    statements). Each clip's prosody is drawn at random from the emotion table, and the
    draw is not kept: the pool carries no emotion labels.
    """
    if seed == 0:
        raise ValueError("seed 0 makes the demo corpus's voices; the pool needs other speakers")
    drawn = []  # (name, the draw's spec, vowels)
    for speaker in range(1, n_speakers + 1):
        rng = np.random.default_rng([seed, speaker, 11])
        for i in range(clips_per_speaker):
            n_syllables = int(rng.integers(4, 10))
            vowels = "".join(rng.choice(list(VOWELS), size=n_syllables))
            while vowels in STATEMENT_VOWELS.values():
                vowels = "".join(rng.choice(list(VOWELS), size=n_syllables))
            emotion = int(rng.integers(1, 9))
            intensity = 1 if emotion == 1 else int(rng.integers(1, 3))
            # a RavdessName only carries the draw into synthesize(); it is not stored
            spec = RavdessName(3, 1, emotion, intensity, 1 + i % 2, 1 + (i // 2) % 2, speaker)
            name = f"pool_{seed}_speaker{speaker:03d}_{i:04d}"
            drawn.append((name, spec, vowels))
    waveforms = map_on_cores(
        functools.partial(_pool_clip, seed=seed, speech_scale=speech_scale),
        [(spec, vowels) for _, spec, vowels in drawn],
    )
    return [(name, y) for (name, _, _), y in zip(drawn, waveforms, strict=True)]


def _write_clip(spec: RavdessName, root: Path, seed: int, speech_scale: float) -> None:
    """Synthesise one corpus clip and write it to its RAVDESS path under ``root``."""
    path = root / f"Actor_{spec.actor:02d}" / spec.file_name
    sf.write(path, synthesize(spec, seed, speech_scale), SAMPLE_RATE_HZ, subtype="PCM_16")


def _pool_clip(job: tuple[RavdessName, str], seed: int, speech_scale: float) -> np.ndarray:
    spec, vowels = job
    return synthesize(spec, seed, speech_scale, vowels=vowels)


T = TypeVar("T")
R = TypeVar("R")


def map_on_cores(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, in order, spread over a process pool of this machine's
    cores when there are at least :data:`PARALLEL_MIN_CLIPS` items (each clip is synthesised
    from its own seed, so the results do not depend on the pool). ``spawn``ed processes: the
    caller may hold threads (a Ray driver) that a fork would copy half-way."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2 or len(items) < PARALLEL_MIN_CLIPS:
        return [fn(x) for x in items]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(cores, mp_context=context) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (8 * cores))))


#: Demo corpus sizes: the full RAVDESS-sized set and the small one behind --smoke-test.
DEMO_SIZES = {
    "full": {"n_actors": 24, "clips_per_actor": 60, "speech_scale": 1.0},
    "smoke": {"n_actors": 24, "clips_per_actor": 8, "speech_scale": 0.5},
}


def demo_corpus_dir(size: str = "full", seed: int = 0) -> Path:
    """Where the demo corpus of a size is cached (``$SER_RAY_CACHE`` or ``~/.cache/ser_ray``)."""
    return storage.node_cache_dir() / f"demo_corpus_{size}_seed{seed}"


def demo_source(smoke_test: bool = False) -> Path:
    """Write (or reuse) the embedded demo corpus and return its folder."""
    size = "smoke" if smoke_test else "full"
    return write_demo_corpus(demo_corpus_dir(size), **DEMO_SIZES[size])
