import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from ser_ray.corpus import ravdess
from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.corpus.ravdess import RavdessNameError, build_manifest, parse_name


def test_parse_all_seven_fields():
    name = parse_name("/x/Actor_12/03-01-05-02-01-02-12.wav")
    assert (name.modality, name.channel, name.emotion_code, name.intensity) == (3, 1, 5, 2)
    assert (name.statement, name.repetition, name.actor) == (1, 2, 12)
    assert name.emotion == "angry" and name.gender == "female" and name.is_audio_speech
    assert parse_name("03-01-08-01-02-01-01.flac").gender == "male"
    assert not parse_name("01-02-03-01-01-01-05.wav").is_audio_speech
    assert name.file_name == "03-01-05-02-01-02-12.wav"


@pytest.mark.parametrize(
    "bad, field",
    [
        ("03-01-09-01-01-01-01.wav", "emotion='09'"),
        ("03-01-05-03-01-01-01.wav", "intensity='03'"),
        ("03-01-05-01-03-01-01.wav", "statement='03'"),
        ("03-01-05-01-01-03-01.wav", "repetition='03'"),
        ("03-01-05-01-01-01-25.wav", "actor='25'"),
        ("04-01-05-01-01-01-01.wav", "modality='04'"),
        ("03-03-05-01-01-01-01.wav", "channel='03'"),
        ("03-01-01-02-01-01-01.wav", "intensity='02'"),  # strong neutral does not exist
        ("03-01-5-01-01-01-01.wav", "emotion='5'"),
    ],
)
def test_bad_field_is_named(bad, field):
    with pytest.raises(RavdessNameError) as err:
        parse_name(f"Actor_01/{bad}")
    assert bad in str(err.value) and field in str(err.value)


def test_non_ravdess_name():
    with pytest.raises(RavdessNameError, match="not a RAVDESS name.*got 1"):
        parse_name("hello.wav")


def test_label_maps():
    assert ravdess.class_names() == [
        "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"
    ]  # fmt: skip
    assert len(ravdess.class_names(merge_calm=True)) == 7
    protocol = ravdess_protocol(merge_calm=True)
    assert protocol.class_indices(["calm", "neutral", "surprised"]) == [0, 0, 6]
    with pytest.raises(ValueError, match="label 'bored' is not one of the protocol's labels"):
        protocol.class_indices(["bored"])


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_manifest_actor_folders_and_skips(tmp_path):
    _touch(tmp_path / "Actor_01/03-01-05-02-01-01-01.wav")
    _touch(tmp_path / "Actor_02/03-01-01-01-01-01-02.wav")
    _touch(tmp_path / "Actor_02/01-01-01-01-01-01-02.wav")  # full AV: not speech audio
    _touch(tmp_path / "Actor_02/notes.wav")
    _touch(tmp_path / "Actor_02/03-01-01-01-01-01-03.wav")  # actor 3 in Actor_02
    _touch(tmp_path / "Actor_01/image.png")
    _touch(tmp_path / "Actor_01/.DS_Store")
    _touch(tmp_path / "README.txt")
    m = build_manifest(str(tmp_path))
    assert [(c.actor, c.emotion) for c in m.clips] == [(1, "angry"), (2, "neutral")]
    reasons = {Path(p).name: r for p, r in m.skipped}
    assert set(reasons) == {
        "01-01-01-01-01-01-02.wav", "notes.wav", "03-01-01-01-01-01-03.wav", "image.png"
    }  # fmt: skip
    assert "not audio-only speech" in reasons["01-01-01-01-01-01-02.wav"]
    assert "not a RAVDESS name" in reasons["notes.wav"]
    assert "stored in Actor_02" in reasons["03-01-01-01-01-01-03.wav"]
    assert "not an audio file" in reasons["image.png"]
    assert m.actors == [1, 2]
    assert len(build_manifest(str(tmp_path), speech_only=False).clips) == 3


def test_manifest_flat_folder_and_uri(tmp_path):
    _touch(tmp_path / "03-01-05-02-01-01-01.wav")
    _touch(tmp_path / "03-01-06-02-01-01-04.mp3")
    m = build_manifest(f"file://{tmp_path}")
    assert [c.path for c in m.clips] == [
        f"file://{tmp_path}/03-01-05-02-01-01-01.wav",
        f"file://{tmp_path}/03-01-06-02-01-01-04.mp3",
    ]


def test_manifest_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder.*--download"):
        build_manifest(str(tmp_path / "nope"))


# --- download -----------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _make_zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(http_root, tmp_path):
    root, url = http_root
    members = {f"Actor_01/03-01-0{e}-01-01-01-01.wav": bytes([e]) * 1000 for e in range(1, 9)}
    md5 = _make_zip(root / "corpus.zip", members)
    size = (root / "corpus.zip").stat().st_size
    dest = tmp_path / "data"
    folder = ravdess.download(dest, url=f"{url}/corpus.zip", md5=md5, size_bytes=size)
    assert folder == dest / "corpus"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.wav"))
    assert files == sorted(members)
    assert (folder / "Actor_01/03-01-03-01-01-01-01.wav").read_bytes() == bytes([3]) * 1000
    # A second call reuses the extraction (no server needed).
    (root / "corpus.zip").unlink()
    assert ravdess.download(dest, url=f"{url}/corpus.zip", md5=md5, size_bytes=size) == folder


def test_download_resumes_partial_file(http_root, tmp_path):
    root, url = http_root
    md5 = _make_zip(root / "c.zip", {"Actor_01/a.wav": b"a" * 50_000})
    whole = (root / "c.zip").read_bytes()
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "c.zip.part").write_bytes(whole[:20_000])  # an interrupted earlier download
    ravdess.download(dest, url=f"{url}/c.zip", md5=md5, size_bytes=len(whole))
    assert (dest / "c.zip").read_bytes() == whole
    assert not (dest / "c.zip.part").exists()


def test_download_wrong_checksum(http_root, tmp_path):
    root, url = http_root
    _make_zip(root / "c.zip", {"a.wav": b"a"})
    with pytest.raises(ravdess.ChecksumError, match="does not match the expected 0{32}"):
        ravdess.download(tmp_path, url=f"{url}/c.zip", md5="0" * 32, size_bytes=None)
    assert not (tmp_path / "c.zip").exists() and not (tmp_path / "c").exists()


def test_extract_refuses_path_escape(tmp_path):
    _make_zip(tmp_path / "evil.zip", {"../../escaped.wav": b"x"})
    with pytest.raises(ValueError, match="escapes"):
        ravdess.safe_extract(tmp_path / "evil.zip", tmp_path / "out")
    assert not (tmp_path.parent / "escaped.wav").exists()
