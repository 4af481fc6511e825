"""Audio decoding, resampling, trimming and MFCC statistics (pure numpy/scipy/soxr, no Ray).

Every function either returns a usable signal or raises :class:`AudioError` whose message is
the reason a clip is rejected (it ends up in ``rejected.csv``).

>>> import numpy as np
>>> y = resample(np.zeros(48_000, dtype=np.float32), 48_000, 16_000)
>>> y.shape, y.dtype
((16000,), dtype('float32'))
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct

import numpy as np
import soundfile as sf
import soxr

from ser_ray.common.errors import UserError
from ser_ray.common.storage import filesystem_of
from ser_ray.features import mfcc

TARGET_SR_HZ = 16_000
SUPPORTED_FORMATS = "WAV, FLAC, OGG/Vorbis, MP3 (and the rest libsndfile reads)"


class AudioError(ValueError):
    """A clip that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class MfccConfig:
    """MFCC settings; the defaults are librosa's (``librosa.feature.mfcc``) with 40 bands."""

    n_mfcc: int = 40  # cepstral coefficients kept
    n_fft: int = 2048  # FFT size in samples (128 ms at 16 kHz)
    hop_length: int = 512  # frame step in samples (32 ms at 16 kHz)
    n_mels: int = 128  # mel bands before the DCT
    deltas: bool = False  # also keep mean/std of the first-order deltas


def read_bytes(uri: str) -> bytes:
    """Read a local path or a URI (``s3://``, ``gs://``, …) through pyarrow's filesystems."""
    try:
        if "://" not in uri:  # a plain read is 3x cheaper than pyarrow's for a small file
            with open(uri, "rb") as f:
                return f.read()
        fs, path = filesystem_of(uri)
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise AudioError(f"file not found: {err}") from err
    except OSError as err:
        raise AudioError(f"cannot read file: {err}") from err


def _check_wav_complete(data: bytes) -> None:
    """libsndfile reads a truncated WAV without complaint; compare the data chunk's size."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            have = len(data) - pos - 8
            if size != 0xFFFFFFFF and have < size:
                raise AudioError(
                    f"truncated WAV: header declares {size} data bytes, file holds {have}"
                )
            return
        pos += 8 + size + (size & 1)
    raise AudioError("truncated WAV: no data chunk")


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes to float32 samples of shape (frames, channels) and the rate in Hz."""
    if not data:
        raise AudioError("empty file (0 bytes)")
    _check_wav_complete(data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.subtype == "PCM_16":  # RAVDESS: libsndfile's own float conversion is 1.5x slower
                samples = f.read(dtype="int16", always_2d=True).astype(np.float32)
                samples *= np.float32(2**-15)  # what libsndfile does: x / 32768, exact
            else:
                samples = f.read(dtype="float32", always_2d=True)
            sr_hz = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        detail = getattr(err, "error_string", None) or err  # libsndfile's, without an address
        raise AudioError(f"cannot decode audio ({detail}); supported: {SUPPORTED_FORMATS}") from err
    if samples.shape[0] == 0:
        raise AudioError("no audio samples (0 frames)")
    if not np.isfinite(samples).all():
        raise AudioError("audio holds NaN or infinite samples")
    return samples, int(sr_hz)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of a (frames, channels) array (a single channel as it is)."""
    if samples.ndim == 1:
        return samples
    return samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)


def resample(y: np.ndarray, sr_in_hz: int, sr_out_hz: int = TARGET_SR_HZ) -> np.ndarray:
    """High-quality resampling with soxr, as ``librosa.load(sr=...)`` does by default
    (same length too: ``ceil(len(y) * sr_out_hz / sr_in_hz)``)."""
    if sr_in_hz == sr_out_hz:
        return y.astype(np.float32, copy=False)
    out = soxr.resample(y, sr_in_hz, sr_out_hz, quality="HQ").astype(np.float32, copy=False)
    size = int(np.ceil(y.size * sr_out_hz / sr_in_hz))
    return out[:size] if out.size >= size else np.pad(out, (0, size - out.size))


def trim_silence(y: np.ndarray, top_db: float = 40.0) -> np.ndarray:
    """Cut leading and trailing parts quieter than ``top_db`` below the peak."""
    import librosa  # here: only trimming needs it (see ser_ray.features.mfcc for why)

    trimmed, _ = librosa.effects.trim(y, top_db=top_db)
    return trimmed


def peak_dbfs(y: np.ndarray) -> float:
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    return 20 * np.log10(peak) if peak > 0 else -np.inf


def load_audio(source: str | bytes, target_sr_hz: int = TARGET_SR_HZ) -> np.ndarray:
    """Decode a path/URI or bytes to float32 mono at ``target_sr_hz``."""
    data = read_bytes(source) if isinstance(source, str) else source
    samples, sr_hz = decode(data)
    return resample(to_mono(samples), sr_hz, target_sr_hz)


def mfcc_stats(
    y: np.ndarray, sr_hz: int = TARGET_SR_HZ, config: MfccConfig = MfccConfig()
) -> dict[str, np.ndarray]:
    """Per-clip MFCC statistics: ``mfcc_mean``, ``mfcc_std`` and their concatenation
    ``mfcc_stats`` (with the deltas' mean and std appended when ``config.deltas``).
    The MFCCs are ``librosa.feature.mfcc``'s, bit for bit (:mod:`ser_ray.features.mfcc`)."""
    coefficients = mfcc.mfcc(
        y, sr_hz, config.n_mfcc, config.n_fft, config.hop_length, config.n_mels
    )
    mean, std = coefficients.mean(axis=1), coefficients.std(axis=1)
    parts = [mean, std]
    if config.deltas:
        import librosa

        delta = librosa.feature.delta(coefficients, width=9, mode="nearest")
        parts += [delta.mean(axis=1), delta.std(axis=1)]
    return {
        "mfcc_mean": mean.astype(np.float32),
        "mfcc_std": std.astype(np.float32),
        "mfcc_stats": np.concatenate(parts).astype(np.float32),
    }


class OpenSmileUnavailable(UserError, RuntimeError):
    """openSMILE (the ``opensmile`` package and its native library) cannot run here."""


@functools.lru_cache(maxsize=1)
def _egemaps_smile():
    try:
        import opensmile
    except ImportError as err:
        raise OpenSmileUnavailable(
            f"eGeMAPS needs the opensmile package ({err}): pip install -e '.[egemaps]' (or "
            "pip install opensmile), or run without +egemaps variants (jobs/prepare.py "
            "--no-egemaps)"
        ) from err
    return opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02,
        feature_level=opensmile.FeatureLevel.Functionals,
    )


def check_opensmile() -> None:
    """Run openSMILE once on 0.5 s of noise; raise :class:`OpenSmileUnavailable` if it cannot
    (jobs call this at start so that a platform without openSMILE fails before any work)."""
    try:
        egemaps_functionals(np.random.default_rng(0).normal(0, 0.1, TARGET_SR_HZ // 2))
    except OpenSmileUnavailable:
        raise
    except Exception as err:  # the native library fails with assorted errors
        raise OpenSmileUnavailable(
            f"openSMILE cannot run on this platform ({type(err).__name__}: {err}); prepare "
            "MFCC features only (jobs/prepare.py --no-egemaps)"
        ) from err


def egemaps_functionals(y: np.ndarray, sr_hz: int = TARGET_SR_HZ) -> np.ndarray:
    """The 88 eGeMAPSv02 functionals of a mono signal, as openSMILE's ``Smile.process_signal``
    computes them (float32, in openSMILE's feature order)."""
    values = _egemaps_smile().process_signal(np.asarray(y, dtype=np.float32), sr_hz)
    return values.to_numpy(dtype=np.float32).reshape(-1)
