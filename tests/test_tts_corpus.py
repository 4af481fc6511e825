"""The espeak-ng corpus has RAVDESS's layout, counts and format, and is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from tts_corpus import FEMALE_VARIANTS, MALE_VARIANTS, espeak_command, render

from ser_ray.corpus.ravdess import RavdessName, build_manifest


def test_layout_counts_and_format(tts_corpus):
    manifest = build_manifest(str(tts_corpus))
    assert not manifest.skipped and len(manifest.clips) == 1440
    assert manifest.actors == list(range(1, 25))
    emotions = [c.emotion_code for c in manifest.clips if c.actor == 9]
    assert emotions.count(1) == 4 and all(emotions.count(e) == 8 for e in range(2, 9))
    durations_s = []
    for clip in manifest.clips[::37]:
        info = sf.info(clip.path)
        assert (info.samplerate, info.channels, info.subtype) == (48_000, 1, "PCM_16")
        durations_s.append(info.duration)
    assert min(durations_s) > 1.5 and max(durations_s) < 7.0


@pytest.mark.slow
def test_voices_follow_actor_gender_and_emotion_changes_prosody():
    angry = RavdessName(3, 1, 5, 2, 1, 1, 3)
    sad = RavdessName(3, 1, 4, 2, 1, 1, 3)
    voices = set()
    for actor in range(1, 25):
        command = espeak_command(RavdessName(3, 1, 1, 1, 1, 1, actor))
        voices.add(command[command.index("-v") + 1])
        variant = command[command.index("-v") + 1].split("+")[1]
        assert variant in (MALE_VARIANTS if actor % 2 else FEMALE_VARIANTS)
    assert len(voices) == 24  # one voice per actor
    loud, quiet = render(angry), render(sad)
    assert np.sqrt(np.mean(loud**2)) > 1.5 * np.sqrt(np.mean(quiet**2))
    assert np.array_equal(render(angry), loud)  # deterministic
    assert loud.size < quiet.size  # sad is slower
