"""RAVDESS corpus facts: file names, emotion labels, manifests and the download.

A RAVDESS name has seven two-digit fields,
``modality-channel-emotion-intensity-statement-repetition-actor.wav``, e.g.
``03-01-05-02-01-01-12.wav`` (audio-only speech, angry, strong, statement 1,
repetition 1, actor 12).

>>> name = parse_name("Actor_12/03-01-05-02-01-01-12.wav")
>>> name.emotion, name.actor, name.gender
('angry', 12, 'female')
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs
from tqdm import tqdm

from ser_ray.common import storage
from ser_ray.common.errors import MissingInputError, UserError
from ser_ray.corpus.clips import ClipTable, clip_frame

log = logging.getLogger(__name__)

#: Emotion codes of the RAVDESS naming scheme.
EMOTIONS: dict[int, str] = {
    1: "neutral",
    2: "calm",
    3: "happy",
    4: "sad",
    5: "angry",
    6: "fearful",
    7: "disgust",
    8: "surprised",
}
MODALITIES = {1: "full-AV", 2: "video-only", 3: "audio-only"}
CHANNELS = {1: "speech", 2: "song"}
INTENSITIES = {1: "normal", 2: "strong"}
STATEMENTS = {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"}
NUM_ACTORS = 24
CLIPS_PER_ACTOR = 60  # audio-only speech
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
#: What a RAVDESS name tells beyond speaker and emotion: extra columns of its clip table.
RAVDESS_COLUMNS = ("emotion_code", "intensity", "statement", "repetition")

ZENODO_URL = "https://zenodo.org/records/1188976/files/Audio_Speech_Actors_01-24.zip"
ZIP_SIZE_BYTES = 208_468_073
ZIP_MD5 = "bc696df654c87fed845eb13823edef8a"

_FIELDS = ("modality", "channel", "emotion", "intensity", "statement", "repetition", "actor")
_CODE_FIELDS = (
    "modality",
    "channel",
    "emotion_code",
    "intensity",
    "statement",
    "repetition",
    "actor",
)
_VALID = {
    "modality": MODALITIES,
    "channel": CHANNELS,
    "emotion": EMOTIONS,
    "intensity": INTENSITIES,
    "statement": STATEMENTS,
    "repetition": {1: "1st", 2: "2nd"},
    "actor": {a: str(a) for a in range(1, NUM_ACTORS + 1)},
}


class RavdessNameError(ValueError):
    """A file name that does not follow the RAVDESS scheme."""


@dataclasses.dataclass(frozen=True)
class RavdessName:
    """The seven fields of a RAVDESS file name (codes as integers)."""

    modality: int
    channel: int
    emotion_code: int
    intensity: int
    statement: int
    repetition: int
    actor: int

    @property
    def emotion(self) -> str:
        return EMOTIONS[self.emotion_code]

    @property
    def gender(self) -> str:
        """Odd actors are male, even actors female."""
        return "male" if self.actor % 2 else "female"

    @property
    def is_audio_speech(self) -> bool:
        return self.modality == 3 and self.channel == 1

    @property
    def file_name(self) -> str:
        """The name back in RAVDESS form, e.g. ``03-01-05-02-01-01-12.wav``."""
        return "-".join(f"{getattr(self, f):02d}" for f in _CODE_FIELDS) + ".wav"


def parse_name(path: str | os.PathLike) -> RavdessName:
    """Parse a RAVDESS file name; raise :class:`RavdessNameError` naming the bad field."""
    name = PurePosixPath(str(path).replace("\\", "/")).name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem = name
    parts = stem.split("-")
    if len(parts) != len(_FIELDS):
        raise RavdessNameError(
            f"{path}: not a RAVDESS name: expected 7 dash-separated two-digit fields "
            f"(modality-channel-emotion-intensity-statement-repetition-actor, e.g. "
            f"03-01-05-02-01-01-12.wav), got {len(parts)}"
        )
    codes = []
    for field, text in zip(_FIELDS, parts, strict=True):
        if len(text) != 2 or not text.isdigit():
            raise RavdessNameError(f"{path}: field {field}={text!r} is not a two-digit code")
        code = int(text)
        if code not in _VALID[field]:
            allowed = ", ".join(f"{c:02d}" for c in _VALID[field])
            raise RavdessNameError(f"{path}: field {field}={text!r} is not one of {allowed}")
        codes.append(code)
    if codes[2] == 1 and codes[3] == 2:
        raise RavdessNameError(f"{path}: field intensity='02' (strong) does not exist for neutral")
    return RavdessName(*codes)


def class_names(merge_calm: bool = False) -> list[str]:
    """Class labels in index order: 8 emotions, or 7 with calm merged into neutral."""
    names = list(EMOTIONS.values())
    return [n for n in names if n != "calm"] if merge_calm else names


@dataclasses.dataclass(frozen=True)
class Clip:
    """One manifest row: where a clip is and what its name says."""

    path: str
    actor: int
    gender: str
    emotion: str
    emotion_code: int
    intensity: int
    statement: int
    repetition: int
    size_bytes: int = -1
    mtime_ns: int = -1


@dataclasses.dataclass
class Manifest:
    clips: list[Clip]
    skipped: list[tuple[str, str]]  # (path, reason)

    @property
    def actors(self) -> list[int]:
        return sorted({c.actor for c in self.clips})


def build_manifest(data_dir: str, speech_only: bool = True) -> Manifest:
    """Scan a RAVDESS-layout folder (``Actor_XX/*.wav`` or flat; local or ``s3://``).

    Audio files with a valid name become clips; everything else that looks like it was meant
    to be a clip (audio extension, bad name; or another modality/channel with
    ``speech_only``) is listed in ``skipped`` with the reason. Hidden files are ignored.
    """
    fs, root = storage.filesystem_of(data_dir)
    prefix = storage.uri_prefix(data_dir)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise MissingInputError(
            f"--data-dir {data_dir}: not a folder. Point it at the RAVDESS folder holding "
            "Actor_01 … Actor_24 (or the .wav files directly); use --download to fetch it."
        )
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    clips: list[Clip] = []
    skipped: list[tuple[str, str]] = []
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(root) :].lstrip("/")
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/")):
            continue
        uri = prefix + entry.path
        if not entry.base_name.lower().endswith(AUDIO_EXTENSIONS):
            if entry.base_name.lower().endswith((".zip", ".txt", ".md", ".csv", ".json")):
                continue  # documentation and archives next to the corpus
            skipped.append((uri, f"not an audio file (extension not in {AUDIO_EXTENSIONS})"))
            continue
        try:
            name = parse_name(entry.base_name)
        except RavdessNameError as err:
            skipped.append((uri, str(err).split(": ", 1)[1]))
            continue
        if speech_only and not name.is_audio_speech:
            skipped.append(
                (
                    uri,
                    f"not audio-only speech (modality {name.modality:02d}, channel "
                    f"{name.channel:02d}); speech_only keeps 03-01",
                )
            )
            continue
        folder = rel.split("/")[-2] if "/" in rel else None
        if folder and folder.startswith("Actor_") and folder != f"Actor_{name.actor:02d}":
            skipped.append((uri, f"actor {name.actor:02d} in the name but stored in {folder}"))
            continue
        clips.append(clip_from_name(uri, name, entry.size or -1, entry.mtime_ns or -1))
    log.info("manifest of %s: %d clips, %d skipped", data_dir, len(clips), len(skipped))
    return Manifest(clips=clips, skipped=skipped)


def clip_from_name(path: str, name: RavdessName, size_bytes: int = -1, mtime_ns: int = -1) -> Clip:
    return Clip(
        path=path,
        actor=name.actor,
        gender=name.gender,
        emotion=name.emotion,
        emotion_code=name.emotion_code,
        intensity=name.intensity,
        statement=name.statement,
        repetition=name.repetition,
        size_bytes=size_bytes,
        mtime_ns=mtime_ns,
    )


def md5_of(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksumError(UserError, RuntimeError):
    pass


def download(
    dest_dir: str | os.PathLike,
    url: str = ZENODO_URL,
    md5: str = ZIP_MD5,
    size_bytes: int | None = ZIP_SIZE_BYTES,
    chunk_bytes: int = 1 << 20,
    timeout_s: float = 60.0,
) -> Path:
    """Download the corpus zip into ``dest_dir`` (resuming a partial file), check its md5,
    extract it safely and return the folder holding ``Actor_XX``.

    A finished extraction is reused. A wrong checksum deletes the file and raises
    :class:`ChecksumError` (run again to download anew).
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    zip_path = dest / url.rsplit("/", 1)[-1]
    extract_dir = dest / zip_path.stem
    done_marker = extract_dir / ".extracted"
    if done_marker.exists() and done_marker.read_text().strip() == md5:
        log.info("corpus already extracted in %s", extract_dir)
        return extract_dir
    if not (zip_path.exists() and size_bytes and zip_path.stat().st_size == size_bytes):
        _fetch(url, zip_path, size_bytes, chunk_bytes, timeout_s)
    got = md5_of(zip_path)
    if got != md5:
        zip_path.unlink()
        raise ChecksumError(
            f"{zip_path}: md5 {got} does not match the expected {md5}; the file was deleted, "
            "run the download again (or check the URL)"
        )
    if extract_dir.exists():
        shutil.rmtree(extract_dir)
    safe_extract(zip_path, extract_dir)
    done_marker.write_text(md5)
    return extract_dir


def _fetch(
    url: str, path: Path, size_bytes: int | None, chunk_bytes: int, timeout_s: float
) -> None:
    partial = path.with_name(path.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        if have and response.status != 206:
            log.info("server ignored the resume request; downloading %s from the start", url)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else size_bytes
        mode = "ab" if have else "wb"
        with (
            open(partial, mode) as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=path.name) as bar,
        ):
            while chunk := response.read(chunk_bytes):
                out.write(chunk)
                bar.update(len(chunk))
    partial.replace(path)


def safe_extract(zip_path: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Extract a zip, refusing members that would land outside ``dest_dir``."""
    dest = Path(dest_dir).resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            target = (dest / member.filename).resolve()
            if not target.is_relative_to(dest):
                raise ValueError(f"{zip_path}: member {member.filename!r} escapes {dest}")
            if member.is_dir() or member.external_attr >> 28 == 0o12:  # dir or symlink
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def read_folder(data_dir: str, speech_only: bool = True) -> ClipTable:
    """A RAVDESS-layout folder as a clip table (:func:`build_manifest`'s clips; speaker = the
    actor number, gender from its parity, the name's other fields as extra columns)."""
    manifest = build_manifest(data_dir, speech_only=speech_only)
    return clip_table(manifest.clips, manifest.skipped)


def clip_table(clips: list[Clip], skipped: list[tuple[str, str]]) -> ClipTable:
    """RAVDESS clips (and the files left out) as a :class:`ClipTable` in RAVDESS's class
    order."""
    rows = [
        {
            "path": c.path,
            "speaker": str(c.actor),
            "emotion": c.emotion,
            "gender": c.gender,
            "size_bytes": c.size_bytes,
            "mtime_ns": c.mtime_ns,
            **{key: getattr(c, key) for key in RAVDESS_COLUMNS},
        }
        for c in clips
    ]
    frame = clip_frame(rows) if rows else clip_frame([]).assign(**dict.fromkeys(RAVDESS_COLUMNS))
    return ClipTable(frame, list(skipped), "ravdess", tuple(EMOTIONS.values()))
