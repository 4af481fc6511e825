"""Shared fixtures: one local Ray instance per test session, a tiny demo corpus and its features."""

from __future__ import annotations

import os

import pytest
from transformers import Data2VecAudioConfig, HubertConfig, Wav2Vec2Config, WavLMConfig

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

#: Fixtures that start Ray (a local instance, or a cluster of two nodes): their tests are
#: marked ``ray``; these and the other expensive ones (a spoken corpus, an S3 server) ``slow``.
RAY_FIXTURES = {"ray_local", "demo_features", "make_cluster"}
SLOW_FIXTURES = RAY_FIXTURES | {"tts_corpus", "moto_s3", "s3_location"}


def pytest_collection_modifyitems(items):
    """The tiers: ``pytest -m "not slow"`` is the fast one (no Ray, no job run end to end);
    ``e2e`` (a job run as a user runs it) and ``cluster`` (two Ray nodes) tests are slow too."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        marked = any(item.get_closest_marker(m) for m in ("e2e", "cluster"))
        if marked or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray instance with 2 CPUs (never joins another cluster)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """A small demo corpus: all 24 actors, 16 clips each (every emotion), ~1.8 s clips."""
    from ser_ray.corpus.demo_corpus import write_demo_corpus

    return write_demo_corpus(
        tmp_path_factory.mktemp("demo_corpus"), n_actors=24, clips_per_actor=16, speech_scale=0.5
    )


@pytest.fixture(scope="session")
def demo_features(ray_local, demo_corpus, tmp_path_factory):
    """Prepared output folder of ``demo_corpus``; ``demo_features / "features"`` is the Parquet."""
    from ser_ray.distributed.prepare import prepare_features

    out = tmp_path_factory.mktemp("demo_features")
    result = prepare_features(demo_corpus, out)
    assert result.n_ok == 24 * 16 and result.n_rejected == 0
    return out


@pytest.fixture(scope="session")
def tts_corpus(tmp_path_factory):
    """Real (espeak-ng) speech that our own synthesiser did not make: all 24 actors, 60 clips.

    Skipped where espeak-ng is missing, except in CI (``CI`` set), where ``.ci/run`` installs it
    and a missing program must fail the run rather than silently drop the check.
    """
    import shutil

    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is missing in CI: .ci/run should have installed it")
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    from tts_corpus import write_tts_corpus

    root = tmp_path_factory.mktemp("tts_corpus")
    write_tts_corpus(root)
    return root


_TINY = dict(
    conv_dim=(16,) * 7,
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    classifier_proj_size=16,
    layerdrop=0.1,
)
_LAYER_NORM = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
#: SSL encoder families, tiny: name -> (config factory, feature extractor's
#: return_attention_mask). Hub models of each kind set these norms and masks.
FAMILIES = {
    "wav2vec2-base": (lambda: Wav2Vec2Config(**_TINY), False),
    "wav2vec2-large-lv60": (lambda: Wav2Vec2Config(**_TINY, **_LAYER_NORM), True),
    "hubert-base": (lambda: HubertConfig(**_TINY), False),
    "wavlm-base-plus": (lambda: WavLMConfig(**_TINY, num_buckets=32, max_bucket_distance=80), True),
    "data2vec-audio": (
        lambda: Data2VecAudioConfig(**{**_TINY, "num_conv_pos_embeddings": 3}),
        True,
    ),
}


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    """family -> folder with a tiny randomly initialised encoder (``save_pretrained``) and
    its feature extractor, for every family in :data:`FAMILIES`."""
    import torch
    from transformers import AutoModel

    from ser_ray.models.ssl import demo_feature_extractor

    root = tmp_path_factory.mktemp("encoders")
    folders = {}
    for i, (name, (make_config, mask)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        AutoModel.from_config(make_config()).save_pretrained(root / name)
        demo_feature_extractor(return_attention_mask=mask).save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    """Each SSL encoder family of :data:`FAMILIES` in turn."""
    return request.param


@pytest.fixture
def s3_location(monkeypatch):
    """A fresh ``s3://`` run location on a moto server on this machine (no network, fake
    credentials): the environment points pyarrow's S3 (and any subprocess) at it."""
    import socket
    import uuid

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", access_key="testing", secret_key="testing",
        region="us-east-1", allow_bucket_creation=True,
    ).create_dir("ser-test")  # fmt: skip
    yield f"s3://ser-test/{uuid.uuid4().hex[:8]}"
    server.stop()


@pytest.fixture
def moto_s3():
    """A moto S3 server in its own process, with bucket ``ser-test``; ``moto_s3.env`` points
    pyarrow (in any process, e.g. Ray nodes) at it (see ``cluster_fixtures.s3_server``)."""
    from cluster_fixtures import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def make_cluster(tmp_path):
    """Factory for real two-node Ray clusters (``cluster_fixtures.two_node_cluster``):
    ``make_cluster(**kwargs)`` defaults ``private_dir`` to ``tmp_path / "private"`` and
    ``shared_dir`` to ``tmp_path / "shared"``; every cluster it made is stopped at teardown."""
    import contextlib
    import pathlib

    from cluster_fixtures import two_node_cluster

    with contextlib.ExitStack() as stack:

        def make(**kwargs):
            kwargs.setdefault("private_dir", tmp_path / "private")
            kwargs.setdefault("shared_dir", tmp_path / "shared")
            pathlib.Path(kwargs["shared_dir"]).mkdir(parents=True, exist_ok=True)
            return stack.enter_context(two_node_cluster(tmp_path, **kwargs))

        yield make
