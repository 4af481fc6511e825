"""MFCCs exactly as ``librosa.feature.mfcc`` computes them, with numpy and ``scipy.fft`` only.

Why not librosa itself: its first spectral call imports numba, llvmlite and ``scipy.signal``
(~190 MB resident and ~1 s in every fresh feature worker, measured), and feature workers then
hold that memory for the whole run. The steps below are librosa's defaults, one by one:

1. centred STFT: the signal padded with ``n_fft // 2`` zeros on both sides, frames every
   ``hop_length`` samples, periodic Hann window, real FFT (``scipy.fft``);
2. power spectrum ``|X|^2`` times the Slaney mel filter bank (Slaney's mel scale, filters
   normalised to constant area), built once per setting;
3. ``10 log10`` of the mel power, floored at ``1e-10`` and at 80 dB below its maximum;
4. orthonormal DCT-II over the mel bands, first ``n_mfcc`` coefficients.

``tests/test_audio.py`` checks the result against librosa bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft

AMIN = 1e-10  # power floor before the log (librosa's ``amin``)
TOP_DB = 80.0  # dynamic range kept below the loudest mel bin (librosa's ``top_db``)
_SLANEY_HZ_PER_MEL = 200.0 / 3  # linear part of Slaney's mel scale, below 1 kHz
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_STEP = np.log(6.4) / 27.0  # log part: 27 mels per factor 6.4


def hz_to_mel(freq_hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (linear below 1 kHz, logarithmic above), as librosa's default."""
    freq_hz = np.asanyarray(freq_hz, dtype=np.float64)
    mels = freq_hz / _SLANEY_HZ_PER_MEL
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
    above = freq_hz >= _SLANEY_LOG_START_HZ
    mels = np.where(
        above,
        log_start_mel
        + np.log(np.maximum(freq_hz, _SLANEY_LOG_START_HZ) / _SLANEY_LOG_START_HZ)
        / _SLANEY_LOG_STEP,
        mels,
    )
    return mels


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """The inverse of :func:`hz_to_mel`."""
    mels = np.asanyarray(mels, dtype=np.float64)
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
    linear = mels * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mels - log_start_mel))
    return np.where(mels >= log_start_mel, logarithmic, linear)


@functools.lru_cache(maxsize=8)
def mel_filter_bank(sr_hz: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32 triangular filters from 0 Hz to ``sr_hz / 2``, each
    scaled to unit area (Slaney); read-only, shared by every call."""
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr_hz)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr_hz / 2.0), n_mels + 2))
    widths_hz = np.diff(edges_hz)
    distance_hz = np.subtract.outer(edges_hz, fft_hz)
    bank = np.zeros((n_mels, fft_hz.size), dtype=np.float32)
    for band in range(n_mels):
        rising = -distance_hz[band] / widths_hz[band]
        falling = distance_hz[band + 2] / widths_hz[band + 1]
        bank[band] = np.maximum(0, np.minimum(rising, falling))
    bank *= (2.0 / (edges_hz[2:] - edges_hz[:n_mels]))[:, np.newaxis]
    bank.flags.writeable = False
    return bank


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window, float64, as ``scipy.signal.get_window("hann", n_fft)``."""
    window = 0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, n_fft + 1)[:-1])
    window.flags.writeable = False
    return window


def power_spectrogram(y: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """|STFT|^2 of a float32 signal, (1 + n_fft // 2, frames), centred frames."""
    padded = np.pad(y, n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    spectrum = scipy.fft.rfft(_hann(n_fft) * frames, axis=-1).astype(np.complex64)
    return (np.abs(spectrum) ** 2).T


def mfcc(
    y: np.ndarray, sr_hz: int, n_mfcc: int = 20, n_fft: int = 2048, hop_length: int = 512,
    n_mels: int = 128,
) -> np.ndarray:  # fmt: skip
    """(n_mfcc, frames) MFCCs of a float32 mono signal, as ``librosa.feature.mfcc``."""
    power = power_spectrogram(np.asarray(y, dtype=np.float32), n_fft, hop_length)
    mel = np.einsum("ft,mf->mt", power, mel_filter_bank(sr_hz, n_fft, n_mels), optimize=True)
    log_mel = 10.0 * np.log10(np.maximum(AMIN, mel))
    log_mel = np.maximum(log_mel, log_mel.max() - TOP_DB)
    return scipy.fft.dct(log_mel, axis=-2, type=2, norm="ortho")[:n_mfcc]
