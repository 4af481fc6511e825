import dataclasses
import io
import struct

import librosa
import numpy as np
import pytest
import soundfile as sf

from ser_ray.features import audio
from ser_ray.features.audio import AudioError


def _tone(sr_hz: int, seconds: float = 1.0, freq_hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr_hz * seconds)) / sr_hz
    return (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _encode(y: np.ndarray, sr_hz: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, subtype, sr_hz",
    [
        ("WAV", "PCM_16", 48_000),
        ("WAV", "PCM_U8", 48_000),
        ("WAV", "PCM_24", 48_000),
        ("WAV", "FLOAT", 22_050),
        ("FLAC", "PCM_16", 44_100),
        ("OGG", "VORBIS", 48_000),
        ("MP3", None, 44_100),
    ],
)
def test_formats_decode_to_16k_mono(fmt, subtype, sr_hz):
    y = audio.load_audio(_encode(_tone(sr_hz, 1.0), sr_hz, fmt, subtype))
    assert y.dtype == np.float32 and y.ndim == 1
    # lossy codecs add encoder delay/padding; PCM keeps the exact length
    assert abs(y.size - 16_000) <= (0 if fmt in ("WAV", "FLAC") else 2000)
    spectrum = np.abs(np.fft.rfft(y[2000:14000]))
    peak_hz = np.argmax(spectrum) * 16_000 / 12_000
    assert abs(peak_hz - 440) < 5  # the tone survives decoding and resampling


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_16_bit_pcm_decodes_to_what_libsndfile_gives_bit_for_bit(fmt):
    """16-bit PCM is read as integers and scaled in numpy: the same floats as libsndfile's."""
    ints = np.random.default_rng(0).integers(-(2**15), 2**15, size=(4_000, 2), dtype=np.int16)
    ints[:2] = [[-(2**15), 2**15 - 1], [0, -1]]  # both extremes, zero and -1
    data = _encode(ints, 48_000, fmt, "PCM_16")
    samples, sr_hz = audio.decode(data)
    expected, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert sr_hz == 48_000 and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, expected)


def test_stereo_is_averaged():
    left, right = _tone(48_000), np.zeros(48_000, np.float32)
    samples, sr = audio.decode(_encode(np.stack([left, right], axis=1), 48_000))
    assert samples.shape == (48_000, 2) and sr == 48_000
    mono = audio.to_mono(samples)
    np.testing.assert_allclose(mono, left / 2, atol=1e-4)
    single = samples[:, :1]
    assert np.array_equal(audio.to_mono(single), single[:, 0]) and audio.to_mono(single).ndim == 1


def test_resample_rate_and_length():
    y = audio.resample(_tone(48_000, 2.5), 48_000, 16_000)
    assert y.shape == (40_000,)
    np.testing.assert_allclose(
        y,
        librosa.resample(_tone(48_000, 2.5), orig_sr=48_000, target_sr=16_000, res_type="soxr_hq"),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not audio" * 10, "cannot decode audio"),
        (_encode(_tone(48_000), 48_000)[:30_000], "truncated WAV: header declares 96000"),
        (_encode(np.zeros((0,), np.float32), 48_000), "no audio samples"),
    ],
)
def test_undecodable_input_says_why(data, reason):
    with pytest.raises(AudioError, match=reason):
        audio.decode(data)


def test_wav_header_without_data_chunk():
    header = b"RIFF" + struct.pack("<I", 100) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
    with pytest.raises(AudioError, match="no data chunk"):
        audio.decode(header + b"\0" * 16)


@pytest.mark.parametrize("sr_hz, n_mels, seconds", [(16_000, 128, 1.5), (22_050, 64, 1.5),
                                                    (16_000, 128, 0.05)])  # fmt: skip
def test_mfcc_stats_equal_librosa_bit_for_bit(sr_hz, n_mels, seconds):
    # the filter bank is cached per setting: two settings in turn must not mix theirs up;
    # 0.05 s is shorter than one FFT frame (librosa warns and pads, as we do)
    y = librosa.chirp(fmin=100, fmax=4000, sr=sr_hz, duration=seconds).astype(np.float32)
    y += 0.01 * np.random.default_rng(0).standard_normal(y.size).astype(np.float32)
    config = audio.MfccConfig(n_mels=n_mels)
    stats = audio.mfcc_stats(y, sr_hz, config)
    reference = librosa.feature.mfcc(y=y, sr=sr_hz, n_mfcc=40, n_mels=n_mels)
    assert stats["mfcc_mean"].shape == (40,) and stats["mfcc_stats"].shape == (80,)
    np.testing.assert_array_equal(stats["mfcc_mean"], reference.mean(axis=1).astype(np.float32))
    np.testing.assert_array_equal(stats["mfcc_std"], reference.std(axis=1).astype(np.float32))
    with_deltas = audio.mfcc_stats(y, sr_hz, dataclasses.replace(config, deltas=True))
    assert with_deltas["mfcc_stats"].shape == (160,)
    np.testing.assert_array_equal(with_deltas["mfcc_stats"][:80], stats["mfcc_stats"])


def test_featurizing_a_clip_leaves_numba_and_librosa_out(tmp_path):
    """Feature workers stay small: librosa's numba/llvmlite/scipy.signal (~190 MB) unused."""
    import subprocess
    import sys

    wav = tmp_path / "03-01-05-01-01-01-01.wav"
    sf.write(wav, _tone(48_000, 2.0), 48_000)
    code = (
        "import sys; from ser_ray.features import featurize as features; "
        f"row = features.featurize_clip({{'path': {str(wav)!r}}}, features.FeatureConfig()); "
        "assert row['reject_reason'] is None, row; "
        "print(sorted(m for m in ('numba', 'librosa', 'scipy.signal') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_trim_silence_cuts_ends():
    y = np.concatenate([np.zeros(8000), _tone(16_000, 1.0), np.zeros(8000)]).astype(np.float32)
    trimmed = audio.trim_silence(y, top_db=40)
    assert 15_000 <= trimmed.size <= 18_500  # frame resolution: 512 samples
    assert audio.peak_dbfs(np.zeros(10)) == -np.inf
