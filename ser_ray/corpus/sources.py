"""Readers of corpora other than RAVDESS into a :class:`~ser_ray.corpus.clips.ClipTable`.

Three sources, each read into the same clip table (no audio is decoded here):

* :func:`read_manifest`: a clip manifest, CSV or JSON lines, with ``path``, ``speaker`` and
  ``emotion`` (or ``label``) columns, optional ``gender``, ``session``, ``fold``, ``split``,
  ``corpus`` and any other columns (kept as text);
* :func:`read_cremad_folder`: a folder of CREMA-D-named clips, ``SSSS_SEN_EMO_LVL.wav``
  (speaker, sentence, emotion, level; e.g. ``1001_DFA_ANG_XX.wav``), with the gender from
  CREMA-D's demographics CSV when given;
* :func:`read_emobox_jsonl`: an EmoBox data file (``key``, ``wav``, ``length``, ``emo``),
  the speaker taken from a column or a regular expression on the key or the audio path.

A source with bad rows (empty fields, missing or repeated files, unknown genders, …) raises
one :class:`~ser_ray.corpus.clips.CorpusError` before anything is returned; its message
names the file, the rows (1-based: the data rows of a CSV, the lines of a JSON-lines file)
and the fix. Relative audio paths are read against the source file's folder; absolute paths
and URIs (``scheme://…``) are kept as written.

>>> is_cremad_name("AudioWAV/1001_DFA_ANG_XX.wav"), is_cremad_name("03-01-05-02-01-01-12.wav")
(True, False)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable

import pyarrow.fs as pafs

from ser_ray.common import storage
from ser_ray.corpus.clips import (
    GENDERS,
    OPTIONAL_COLUMNS,
    UNKNOWN_SPEAKER,
    ClipTable,
    CorpusError,
    clip_frame,
    mark_unknown_speakers,
)
from ser_ray.corpus.ravdess import AUDIO_EXTENSIONS, read_folder

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".json")
#: Files next to a corpus that are neither clips nor worth a "skipped" line.
DOC_EXTENSIONS = (".zip", ".txt", ".md", ".csv", ".json")
#: At most this many rows are listed per problem in an error message.
MAX_LISTED_ROWS = 10

#: CREMA-D emotion codes.
CREMAD_EMOTIONS = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
CREMAD_LEVELS = ("LO", "MD", "HI", "XX")
_CREMAD_NAME = re.compile(r"(\d{4})_([A-Za-z]{3})_([A-Za-z]{3})_([A-Za-z]{2})")
_CREMAD_PATTERN = (
    "SSSS_SEN_EMO_LVL (4-digit speaker, 3-letter sentence code, emotion "
    f"{'/'.join(CREMAD_EMOTIONS)}, level {'/'.join(CREMAD_LEVELS)}), e.g. 1001_DFA_ANG_XX.wav"
)

_GENDER_WORDS = {"m": "male", "male": "male", "f": "female", "female": "female"}
_FILE_COLUMNS = ("size_bytes", "mtime_ns")  # computed here, never read from a source


# --- shared: rows with problems, paths, records, folders -------------------------------------


class _RowProblems:
    """Problems of a source's rows, collected by kind and raised as one :class:`CorpusError`
    naming the source, the rows (at most :data:`MAX_LISTED_ROWS` each) and the fix."""

    def __init__(self, source: str):
        self.source = source
        self._rows: dict[tuple[str, str], list[str]] = {}  # (problem, fix) -> rows shown
        self._numbers: set[int] = set()

    def add(self, problem: str, row: int, value: object, fix: str, note: str = "") -> None:
        """Note that ``row`` has ``problem``: ``value`` is what it holds (None: not shown),
        ``note`` a word more on this row."""
        shown = ", ".join(part for part in ("" if value is None else repr(value), note) if part)
        self._rows.setdefault((problem, fix), []).append(
            f"row {row}" + (f" ({shown})" if shown else "")
        )
        self._numbers.add(row)

    def raise_if_any(self) -> None:
        """Raise the problems noted so far, if any: one line each (``problem: rows. Fix:
        fix``), after the source's name."""
        if not self._rows:
            return
        parts = [
            f"{problem}: {_listed_rows(rows)}. Fix: {fix}"
            for (problem, fix), rows in self._rows.items()
        ]
        if len(parts) == 1:
            raise CorpusError(f"{self.source}: {parts[0]}")
        head = f"{self.source}: {len(self._numbers)} rows with problems:"
        raise CorpusError("\n  ".join([head, *parts]))


def _listed_rows(rows: list[str]) -> str:
    """``row 3 ('x'), row 7 ('y') and 4 more``: at most :data:`MAX_LISTED_ROWS` rows."""
    more = len(rows) - MAX_LISTED_ROWS
    return ", ".join(rows[:MAX_LISTED_ROWS]) + (f" and {more} more" if more > 0 else "")


def _absolute(source: str | os.PathLike) -> str:
    """A local path made absolute, or a URI as it is (without a trailing '/')."""
    _, path = storage.filesystem_of(source)
    return storage.uri_prefix(source) + path.rstrip("/")


def _folder_of(source: str | os.PathLike) -> str:
    """The folder holding a local file (absolute) or a URI (kept a URI)."""
    return posixpath.dirname(_absolute(source))


def _resolve(path: str, folder: str) -> str:
    """``path`` read against ``folder`` when relative; absolute paths and URIs as written."""
    if "://" in path or os.path.isabs(path):
        return path
    scheme, sep, rest = folder.rpartition("://")
    if sep:
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.normpath(os.path.join(folder, path))


def _local_stat(path: str) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of a local file, (-1, -1) for a URI (not looked at),
    None when a local path is not an existing file."""
    if "://" in path:
        return -1, -1
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else None


def _read_text(source: str | os.PathLike) -> str:
    """A local file's or a URI's text (UTF-8, a byte-order mark dropped)."""
    filesystem, path = storage.filesystem_of(source)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise CorpusError(f"{source}: no such file; check the path")
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8-sig")


def _read_records(
    source: str | os.PathLike, what: str = "manifest"
) -> tuple[list[tuple[int, dict]], list[str]]:
    """(rows as (row number, {column: value}), the columns in first-seen order) of a CSV or
    JSON-lines file (``.json`` also: JSON lines, a JSON array of objects, or one object of
    objects keyed by ``key`` as EmoBox's ``.json`` files). Column names are stripped."""
    name = str(source)
    extension = posixpath.splitext(name.lower())[1]
    if extension not in MANIFEST_EXTENSIONS:
        raise CorpusError(
            f"{name}: unknown {what} type {extension or '(no extension)'!r}; give a CSV (.csv) "
            "or JSON-lines (.jsonl, .json) file"
        )
    text = _read_text(source)
    records = _csv_records(name, text) if extension == ".csv" else _json_records(name, text)
    columns = list(dict.fromkeys(column for _, row in records for column in row))
    return records, columns


def _csv_records(name: str, text: str) -> list[tuple[int, dict]]:
    """The data rows of a CSV text (numbered from 1 after the header; blank rows left out)
    as {header column: cell}; a row with more cells than the header is an error."""
    try:
        reader = csv.reader(io.StringIO(text))
        header = [column.strip() for column in next(reader, [])]
        rows = [(number, values) for number, values in enumerate(reader, 1) if any(values)]
    except csv.Error as err:
        raise CorpusError(f"{name}: not a readable CSV file ({err}); fix its quoting") from err
    problems = _RowProblems(name)
    for number, values in rows:
        if len(values) > len(header):
            problems.add(
                "more values than the header has columns",
                number,
                None,
                "quote values holding commas, or add the missing column names to the header",
            )
    problems.raise_if_any()
    return [(number, dict(zip(header, values, strict=False))) for number, values in rows]


def _json_records(name: str, text: str) -> list[tuple[int, dict]]:
    """The objects of a JSON-lines text (numbered by line; blank lines left out), of a JSON
    array (numbered by position) or of one object of objects (``key`` added)."""
    whole = _whole_json(text)
    if isinstance(whole, list):  # a JSON array of objects
        items = list(enumerate(whole, 1))
    elif isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
        items = [(n, {"key": k, **v}) for n, (k, v) in enumerate(whole.items(), 1)]
    else:  # JSON lines
        items = []
        problems = _RowProblems(name)
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                fix = "write one JSON object per line (JSON lines)"
                problems.add(f"not valid JSON ({err.msg})", number, line[:60], fix)
        problems.raise_if_any()
    problems = _RowProblems(name)
    for number, item in items:
        if not isinstance(item, dict):
            problems.add("not a JSON object", number, item, "write one {...} object per row")
    problems.raise_if_any()
    return [(number, {str(k).strip(): v for k, v in item.items()}) for number, item in items]


def _whole_json(text: str) -> object:
    """The text as one JSON document, or None when it is not one (e.g. JSON lines)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _text(value: object) -> str:
    """A cell as stripped text (None and JSON null: empty)."""
    return "" if value is None else str(value).strip()


def _gender(value: object) -> str | None:
    """``male``/``female`` from m/f/male/female in any case, None from empty; ValueError
    otherwise."""
    text = _text(value).lower()
    if not text:
        return None
    if text not in _GENDER_WORDS:
        raise ValueError(text)
    return _GENDER_WORDS[text]


def _checked_clips(
    problems: _RowProblems,
    rows: list[tuple[int, dict]],
    folder: str,
    hint: str = "",
    required: tuple[str, ...] = ("path", "speaker", "emotion"),
) -> list[dict]:
    """The rows (each with ``path``, ``speaker``, ``emotion`` as text) with their paths read
    against ``folder`` and their file size and time, noting in ``problems`` the rows with an
    empty ``required`` field, a path that is not a file (local paths; ``hint`` added to the
    fix) or a path seen before."""
    clips = []
    first_row: dict[str, int] = {}
    for number, row in rows:
        empty = [column for column in required if not row[column]]
        for column in empty:
            problems.add(f"empty {column}", number, None, f"give every row a {column}")
        if not row["path"]:
            continue
        path = _resolve(row["path"], folder)
        if path in first_row:
            note = f"as row {first_row[path]}"
            problems.add(
                "the same file as an earlier row", number, path, "list each clip once", note
            )
            continue
        first_row[path] = number
        file_stat = _local_stat(path)
        if file_stat is None:
            problems.add(
                "no such file",
                number,
                path,
                f"correct the path (relative paths are read against {folder}{hint}) or drop "
                "the row",
            )
            continue
        if not empty:
            clips.append(
                {**row, "path": path, "size_bytes": file_stat[0], "mtime_ns": file_stat[1]}
            )
    return clips


@dataclasses.dataclass(frozen=True)
class _AudioFile:
    """An audio file found in a corpus folder: absolute path or URI, base name, size, time."""

    path: str
    name: str
    size_bytes: int
    mtime_ns: int


def _scan_audio(data_dir: str) -> tuple[list[_AudioFile], list[tuple[str, str]]]:
    """(audio files in path order, skipped (path, reason)) of a local or URI folder, searched
    recursively. Hidden files and folders and ``__MACOSX`` are ignored, and so are documents
    and archives (:data:`DOC_EXTENSIONS`); other non-audio files are skipped, with why."""
    filesystem, root = storage.filesystem_of(data_dir)
    prefix = storage.uri_prefix(data_dir)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise CorpusError(f"{data_dir}: not a folder; point it at the folder holding the clips")
    found: list[_AudioFile] = []
    skipped: list[tuple[str, str]] = []
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    for entry in sorted(entries, key=lambda e: e.path):
        rel = entry.path[len(root) :].lstrip("/")
        if entry.type != pafs.FileType.File or any(
            part.startswith(".") or part == "__MACOSX" for part in rel.split("/")
        ):
            continue
        lower = entry.base_name.lower()
        if lower.endswith(AUDIO_EXTENSIONS):
            size = -1 if entry.size is None else entry.size  # a zero-byte file has size 0
            mtime = -1 if entry.mtime_ns is None else entry.mtime_ns
            found.append(_AudioFile(prefix + entry.path, entry.base_name, size, mtime))
        elif not lower.endswith(DOC_EXTENSIONS):
            reason = f"not an audio file (extension not in {AUDIO_EXTENSIONS})"
            skipped.append((prefix + entry.path, reason))
    return found, skipped


# --- clip manifests ---------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike, unknown_speaker: str = UNKNOWN_SPEAKER) -> ClipTable:
    """A CSV (``.csv``) or JSON-lines (``.jsonl``, ``.json``) clip manifest as a clip table.

    Columns: ``path``, ``speaker``, ``emotion`` (``label`` is read as ``emotion`` when there
    is no ``emotion`` column), optionally ``gender`` (m/f/male/female, any case; empty: not
    known), ``session``, ``fold``, ``split``, ``corpus``; any other column is kept, as text.
    Known column names are matched in any case. Relative paths are read against the
    manifest's folder. A clip whose speaker is empty or ``unknown_speaker`` (any case) gets
    its own pseudo-speaker (:func:`ser_ray.corpus.clips.mark_unknown_speakers`). Raises
    :class:`CorpusError` for an unknown file type, an empty manifest, a missing column, and
    rows with an empty path or emotion, a missing or repeated file or an unknown gender.
    """
    source = str(path)
    records, columns = _read_records(path)
    if not records:
        raise CorpusError(f"{source}: no clips in the manifest; add one row per clip")
    renames = _manifest_columns(source, columns)
    problems = _RowProblems(source)
    rows = [(number, _manifest_row(problems, number, raw, renames)) for number, raw in records]
    clips = _checked_clips(problems, rows, _folder_of(path), required=("path", "emotion"))
    problems.raise_if_any()
    log.info("manifest %s: %d clips", source, len(clips))
    table = ClipTable(frame=clip_frame(clips), skipped=[], source="manifest")
    return mark_unknown_speakers(table, unknown_speaker)


def _manifest_columns(source: str, columns: list[str]) -> dict[str, str]:
    """Manifest column -> clip column (known names lower-cased, ``label`` as ``emotion``
    when there is no ``emotion`` column; others as written, size and time left out);
    :class:`CorpusError` naming the present columns when a required one is missing."""
    known = ("path", "speaker", "emotion", *OPTIONAL_COLUMNS)
    renames = {c: c.lower() if c.lower() in known else c for c in columns}
    if "emotion" not in renames.values():
        renames.update({c: "emotion" for c in columns if c.lower() == "label"})
    missing = [c for c in ("path", "speaker", "emotion") if c not in renames.values()]
    if missing:
        raise CorpusError(
            f"{source}: missing column(s) {', '.join(missing)}; the manifest has "
            f"{', '.join(columns) or 'no columns'}. A manifest needs the columns path, speaker "
            "and emotion (or label), and may add gender, session, fold, split, corpus"
        )
    return {c: name for c, name in renames.items() if name not in _FILE_COLUMNS}


def _manifest_row(problems: _RowProblems, number: int, raw: dict, renames: dict) -> dict:
    """A manifest row as clip fields: text stripped, optional fields empty -> None, the
    gender normalised (an unknown one noted in ``problems``)."""
    row = {name: _text(raw.get(column)) for column, name in renames.items()}
    for name in OPTIONAL_COLUMNS:
        row[name] = row.get(name) or None
    try:
        row["gender"] = _gender(row["gender"])
    except ValueError:
        fix = f"write {' or '.join(GENDERS)} (or m/f), or leave it empty when not known"
        problems.add("unknown gender", number, row["gender"], fix)
    return row


# --- CREMA-D folders --------------------------------------------------------------------------


def _parse_cremad(name: str) -> tuple[str, str, str, str]:
    """(speaker, sentence code, emotion word, level code) of a CREMA-D file name; ValueError
    saying what does not fit."""
    base = posixpath.basename(name.replace("\\", "/"))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    match = _CREMAD_NAME.fullmatch(stem)
    if not match:
        raise ValueError(f"not a CREMA-D name: expected {_CREMAD_PATTERN}")
    speaker, sentence, emotion, level = (part.upper() for part in match.groups())
    if emotion not in CREMAD_EMOTIONS:
        raise ValueError(f"emotion code {emotion!r} is not one of {', '.join(CREMAD_EMOTIONS)}")
    if level not in CREMAD_LEVELS:
        raise ValueError(f"level {level!r} is not one of {', '.join(CREMAD_LEVELS)}")
    return speaker, sentence, CREMAD_EMOTIONS[emotion], level


def is_cremad_name(name: str) -> bool:
    """Whether a file name (or path) follows CREMA-D's ``SSSS_SEN_EMO_LVL`` scheme."""
    try:
        _parse_cremad(name)
    except ValueError:
        return False
    return True


def looks_like_cremad(data_dir: str) -> bool:
    """Whether a folder (local or URI) holds audio files and more than half of them have
    CREMA-D names; False for anything that is not a folder."""
    try:
        files, _ = _scan_audio(data_dir)
    except (ValueError, OSError):  # CorpusError, or pyarrow's errors for a bad URI
        return False
    named = sum(is_cremad_name(f.name) for f in files)
    return bool(files) and named > len(files) / 2


def read_cremad_folder(data_dir: str, demographics: str | None = None) -> ClipTable:
    """A folder of CREMA-D-named clips (local or URI, searched recursively) as a clip table.

    ``1001_DFA_ANG_XX.wav`` gives speaker ``1001``, emotion ``angry`` and the extra columns
    ``sentence`` (``DFA``) and ``level`` (``XX``). Audio files with other names are listed in
    ``skipped`` with the expected pattern; so is a second file of the same clip (e.g. the
    ``.mp3`` next to the ``.wav``: the first extension of ``AUDIO_EXTENSIONS`` is kept).
    Documents, hidden files and ``__MACOSX`` are ignored. The gender comes from
    ``demographics`` (CREMA-D's ``VideoDemographics.csv``: ``ActorID``, ``Sex``) when given,
    else is None. Raises :class:`CorpusError` when the folder holds no CREMA-D clip.
    """
    files, skipped = _scan_audio(data_dir)
    genders = _cremad_genders(demographics) if demographics else {}
    rank = {extension: k for k, extension in enumerate(AUDIO_EXTENSIONS)}
    ordered = sorted(files, key=lambda f: rank[posixpath.splitext(f.name.lower())[1]])
    kept: dict[str, str] = {}  # clip stem -> the file kept
    rows = []
    for file in ordered:
        try:
            speaker, sentence, emotion, level = _parse_cremad(file.name)
        except ValueError as err:
            skipped.append((file.path, str(err)))
            continue
        stem = posixpath.splitext(file.name)[0].upper()
        if stem in kept:
            skipped.append((file.path, f"the same clip as {kept[stem]} (kept)"))
            continue
        kept[stem] = file.path
        rows.append(
            {
                "path": file.path,
                "speaker": speaker,
                "emotion": emotion,
                "gender": genders.get(speaker),
                "corpus": "cremad",
                "size_bytes": file.size_bytes,
                "mtime_ns": file.mtime_ns,
                "sentence": sentence,
                "level": level,
            }
        )
    if not rows:
        raise CorpusError(
            f"{data_dir}: no CREMA-D clips ({len(skipped)} files skipped); expected audio "
            f"files named {_CREMAD_PATTERN}"
        )
    _warn_unknown_speakers(demographics, genders, {row["speaker"] for row in rows})
    rows.sort(key=lambda row: row["path"])
    log.info("CREMA-D folder %s: %d clips, %d skipped", data_dir, len(rows), len(skipped))
    return ClipTable(frame=clip_frame(rows), skipped=skipped, source="cremad", label_order=None)


def _cremad_genders(demographics: str) -> dict[str, str | None]:
    """Speaker id -> gender from CREMA-D's demographics CSV (``ActorID``, ``Sex``)."""
    records, columns = _read_records(demographics, "demographics")
    missing = [c for c in ("ActorID", "Sex") if c not in columns]
    if missing:
        raise CorpusError(
            f"{demographics}: missing column(s) {', '.join(missing)}; it has "
            f"{', '.join(columns) or 'no columns'}. Pass CREMA-D's VideoDemographics.csv "
            "(ActorID, Sex: Male/Female)"
        )
    problems = _RowProblems(demographics)
    genders: dict[str, str | None] = {}
    for number, row in records:
        try:
            genders[_text(row.get("ActorID"))] = _gender(row.get("Sex"))
        except ValueError:
            problems.add("unknown Sex", number, _text(row.get("Sex")), "write Male or Female")
    problems.raise_if_any()
    return genders


def _warn_unknown_speakers(
    demographics: str | None, genders: dict[str, str | None], speakers: Iterable[str]
) -> None:
    unknown = sorted(set(speakers) - set(genders))
    if demographics and unknown:
        log.warning(
            "%s lists no gender for speaker(s) %s; their gender is left unknown",
            demographics,
            ", ".join(unknown),
        )


# --- EmoBox data files ------------------------------------------------------------------------


def read_emobox_jsonl(
    path: str | os.PathLike,
    speaker_regex: str | None = None,
    speaker_column: str | None = None,
    audio_root: str | None = None,
) -> ClipTable:
    """An EmoBox data file (JSON lines with ``key``, ``wav``, ``length``, ``emo``; EmoBox's
    ``.json`` form, one object keyed by ``key``, is read too) as a clip table.

    EmoBox has no speaker field: the speaker is the value of ``speaker_column`` (a key of the
    objects), or what ``speaker_regex`` finds in the ``key``, else in the ``wav`` path (its
    first group, or the whole match without groups). Relative ``wav`` paths are read against
    ``audio_root`` (default: the file's folder; EmoBox writes them relative to its own
    checkout, e.g. ``downloads/cafe/…``). ``dataset`` fills ``corpus``; ``key`` is kept as an
    extra column. Raises :class:`CorpusError` when neither (or both) of ``speaker_regex`` and
    ``speaker_column`` is given, and for rows without a speaker, a path or an emotion, and
    missing or repeated files.
    """
    source = str(path)
    records, columns = _read_records(path, "EmoBox data")
    if not records:
        raise CorpusError(f"{source}: no clips in the EmoBox file; add one object per clip")
    find_speaker = _speaker_finder(source, records, columns, speaker_regex, speaker_column)
    problems = _RowProblems(source)
    rows = []
    for number, raw in records:
        key, wav = _text(raw.get("key")), _text(raw.get("wav"))
        speaker = find_speaker(raw, key, wav)
        if speaker is None:
            _no_speaker(problems, number, key or wav, speaker_regex, speaker_column)
            continue
        row = {"path": wav, "speaker": speaker, "emotion": _text(raw.get("emo"))}
        rows.append((number, {**row, "corpus": _text(raw.get("dataset")) or None, "key": key}))
    if audio_root:
        clips = _checked_clips(problems, rows, _absolute(audio_root))
    else:
        hint = "; EmoBox's own paths are relative to its checkout: pass audio_root"
        clips = _checked_clips(problems, rows, _folder_of(path), hint)
    problems.raise_if_any()
    log.info("EmoBox file %s: %d clips", source, len(clips))
    return ClipTable(frame=clip_frame(clips), skipped=[], source="emobox")


def _no_speaker(
    problems: _RowProblems,
    number: int,
    value: str,
    speaker_regex: str | None,
    speaker_column: str | None,
) -> None:
    """Note in ``problems`` that row ``number`` gave no speaker, and how to fix that."""
    if speaker_regex is not None:
        fix = "change speaker_regex so that it finds the speaker in every key (or wav path)"
        problems.add(f"speaker_regex {speaker_regex!r} does not match", number, value, fix)
    else:
        fix = f"give every object a {speaker_column}"
        problems.add(f"no {speaker_column}", number, value, fix)


def _speaker_finder(
    source: str,
    records: list[tuple[int, dict]],
    columns: list[str],
    speaker_regex: str | None,
    speaker_column: str | None,
) -> Callable[[dict, str, str], str | None]:
    """A function (object, key, wav) -> speaker or None, from the column or the regex."""
    if (speaker_regex is None) == (speaker_column is None):
        first_key = _text(records[0][1].get("key")) or "cremad-1001-DFA-ANG-XX"
        raise CorpusError(
            f"{source}: EmoBox files name no speaker; pass exactly one of speaker_column (a "
            f"key of the objects; this file has {', '.join(columns)}) and speaker_regex, "
            rf"e.g. speaker_regex=r'^[^-]+-(\d+)-' finds the speaker in keys like "
            f"{first_key!r} (its first group, or the whole match)"
        )
    if speaker_column is not None:
        if speaker_column not in columns:
            raise CorpusError(
                f"{source}: speaker_column {speaker_column!r} is not a key of the objects; "
                f"they have {', '.join(columns)}"
            )
        return lambda raw, key, wav: _text(raw.get(speaker_column)) or None
    try:
        pattern = re.compile(speaker_regex)
    except re.error as err:
        raise CorpusError(f"speaker_regex {speaker_regex!r} is not a valid regex: {err}") from err

    def find(raw: dict, key: str, wav: str) -> str | None:
        for text in (key, wav):
            match = pattern.search(text)
            if match:
                found = match.group(1) if pattern.groups else match.group(0)
                if found:
                    return found
        return None

    return find


# --- any source -------------------------------------------------------------------------------


def read_corpus(
    source: str,
    *,
    speech_only: bool = True,
    speaker_regex: str | None = None,
    unknown_speaker: str = UNKNOWN_SPEAKER,
) -> ClipTable:
    """The clip table of any corpus a user points at: a manifest file (CSV or JSON lines;
    an EmoBox data file when its objects have ``wav`` and ``emo``, speakers by
    ``speaker_regex``; a manifest's speaker ``unknown_speaker`` or empty: not known), a folder
    of CREMA-D-named clips, else a RAVDESS-layout folder (``speech_only``: audio-only speech
    names only)."""
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        if _is_emobox(source):
            return read_emobox_jsonl(source, speaker_regex=speaker_regex)
        return read_manifest(source, unknown_speaker)
    if looks_like_cremad(source):
        return read_cremad_folder(source)
    return read_folder(source, speech_only=speech_only)


def _is_emobox(source: str) -> bool:
    """Whether a JSON manifest is an EmoBox data file (objects with ``wav`` and ``emo``, no
    ``path``)."""
    if source.lower().endswith(".csv"):
        return False
    _, columns = _read_records(source, "manifest")
    return {"wav", "emo"} <= set(columns) and "path" not in columns
