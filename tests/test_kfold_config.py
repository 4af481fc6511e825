"""How the main job resolves its settings and resources (no training)."""

import json

import pandas as pd
import pytest

from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.distributed.resources import FOLD_TRIAL_RESOURCES, gpus_per_worker, plan_folds
from ser_ray.study import summary
from ser_ray.study.config import KFoldConfig, study_train_config
from ser_ray.study.encoders import check_model_reachable
from ser_ray.study.params import (
    params_provenance,
    read_params,
    train_config_for,
    warn_study_fields_in_params,
)
from ser_ray.study.report import trained_on
from ser_ray.study.variants import parse_variant, parse_variants


def test_model_default_depends_on_data_and_family():
    assert KFoldConfig().model_for("wav2vec2") == "demo"
    assert KFoldConfig(data_dir="/data").model_for("wav2vec2") == "facebook/wav2vec2-base"
    assert KFoldConfig(data_dir="/data").model_for("wavlm") == "microsoft/wavlm-base-plus"
    local = KFoldConfig(data_dir="/data", train=study_train_config(model="./local"))
    assert local.model_for("wav2vec2") == local.model_for("hubert") == "./local"
    per_family = KFoldConfig(
        variants=("wav2vec2", "wavlm+probe"),
        train=study_train_config(model="demo,wavlm=/models/wavlm-large"),
    )
    assert per_family.model_for("wav2vec2") == "demo"
    assert per_family.model_for("wavlm") == "/models/wavlm-large"
    probe = train_config_for(per_family, 1, parse_variant("wavlm+probe"))
    assert (probe.model, probe.probe) == ("/models/wavlm-large", True)
    assert train_config_for(per_family, 1).probe is False


def test_a_probe_trains_its_head_longer_and_faster_unless_the_flags_say_otherwise():
    probe, tuned = parse_variant("wav2vec2+probe"), parse_variant("wav2vec2")
    default = KFoldConfig(variants=("wav2vec2", "wav2vec2+probe"))
    assert [
        (c.epochs, c.lr_head, c.head_dropout)
        for c in (train_config_for(default, 1, tuned), train_config_for(default, 1, probe))
    ] == [(8, 1e-3, 0.1), (20, 3e-3, 0.0)]
    flags = KFoldConfig(train=study_train_config(epochs=5, lr_head=1e-2))
    given = train_config_for(flags, 1, probe)
    assert (given.epochs, given.lr_head, given.head_dropout) == (5, 1e-2, 0.0)
    assert train_config_for(KFoldConfig(smoke_test=True), 1, probe).epochs == 1
    with pytest.raises(ValueError, match="'wavelm' is not an SSL family"):
        KFoldConfig(train=study_train_config(model="wavelm=x"))
    with pytest.raises(ValueError, match="twice"):
        KFoldConfig(train=study_train_config(model="wavlm=x,wavlm=y"))


def test_a_variant_runs_an_encoder_of_its_own_family_only(encoders):
    check_model_reachable(str(encoders["wavlm-base-plus"]), "wavlm")
    with pytest.raises(ValueError, match="a wav2vec2 encoder: name a wavlm encoder"):
        check_model_reachable("demo", "wavlm")


def test_an_unreachable_model_stops_the_job_before_any_work(tmp_path, monkeypatch):
    from ser_ray.study import kfold

    def no_features(*args, **kwargs):
        raise AssertionError("features were prepared before the model was checked")

    monkeypatch.setattr(kfold, "prepare_features", no_features)
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match=r"--model .*no_such_model.*downloaded copy"):
        kfold.run_kfold(
            KFoldConfig(train=study_train_config(model=missing), out=str(tmp_path / "run"))
        )
    check_model_reachable("demo")  # the demo encoders need nothing
    check_model_reachable("demo-random")


def test_flags_override_params_file(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"params": {"lr_encoder": 3e-5, "weight_decay": 0.02,
                                           "betas": [0.9, 0.98]}}))  # fmt: skip
    cfg = train_config_for(KFoldConfig(params=str(best), train=study_train_config(epochs=3)))
    assert (cfg.lr_encoder, cfg.weight_decay, cfg.betas, cfg.epochs) == (3e-5, 0.02, (0.9, 0.98), 3)
    assert (
        train_config_for(
            KFoldConfig(params=str(best), train=study_train_config(lr_encoder=1e-4))
        ).lr_encoder
        == 1e-4
    )
    assert train_config_for(KFoldConfig(smoke_test=True)).epochs == 1


def test_settings_saved_under_the_old_name_n_val_actors_are_read_as_n_val_speakers(tmp_path):
    """``n_val_actors`` became ``n_val_speakers``: a config or ``--params`` file written before
    the rename still sets it; where both names are given, the new one wins."""
    from ser_ray.training.config import TrainConfig

    assert TrainConfig.from_dict({"n_val_actors": 2}).n_val_speakers == 2
    both = {"n_val_actors": 2, "n_val_speakers": 3}
    assert TrainConfig.from_dict(both).n_val_speakers == 3
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"params": {"lr_encoder": 3e-5, "n_val_actors": 2}}))
    cfg = KFoldConfig(params=str(best), train=study_train_config())
    assert read_params(cfg).shared == {"lr_encoder": 3e-5, "n_val_speakers": 2}
    assert train_config_for(cfg).n_val_speakers == 2


def test_a_params_file_setting_a_study_flag_is_warned_about(tmp_path, caplog):
    """``refit``, ``epochs``, ... are the study's own (its flags decide them): a file that sets
    them otherwise is not silently overruled."""
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"refit": True, "epochs": 8, "head_warmup_epochs": 0}))
    cfg = KFoldConfig(params=str(best), train=study_train_config())
    with caplog.at_level("WARNING"):
        # epochs 8 is the study's
        assert warn_study_fields_in_params(cfg, read_params(cfg)) == ["refit"]
    assert "sets refit" in caplog.text and "give --refit instead" in caplog.text
    resolved = train_config_for(cfg)
    assert resolved.refit is False and resolved.head_warmup_epochs == 0
    flagged = KFoldConfig(params=str(best), train=study_train_config(refit=True))
    assert warn_study_fields_in_params(flagged, read_params(flagged)) == []
    assert warn_study_fields_in_params(KFoldConfig(), None) == []


def test_nested_params_per_fold(tmp_path):
    best = tmp_path / "best.json"
    per_fold = {str(k): {"params": {"lr_encoder": k * 1e-5}, "val_uar": 0.3} for k in (1, 2)}
    best.write_text(json.dumps({"per_fold": per_fold}))
    cfg = KFoldConfig(params=str(best))
    assert train_config_for(cfg, 2).lr_encoder == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="not for fold 3"):
        train_config_for(cfg, 3)


def test_unknown_settings_are_refused(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"params": {"learning_rate": 1e-4}}))
    with pytest.raises(ValueError, match=r"unknown training settings \['learning_rate'\]"):
        train_config_for(KFoldConfig(params=str(best)))
    with pytest.raises(ValueError, match="unknown model family 'bert'"):
        KFoldConfig(variants=("svm", "bert"))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tapt'\] for svm"):
        KFoldConfig(variants=("svm+tapt",))
    assert KFoldConfig(variants=("svm", " svm+spknorm+egemaps")).variants == (
        "svm",
        "svm+egemaps+spknorm",
    )


def test_the_resource_plan_gives_workers_whole_cpus_and_runs_what_fits(ray_local):
    # this cluster (2 CPUs): two folds at once, one single-threaded worker each
    plan = plan_folds(KFoldConfig(), 6)
    assert (plan.concurrent_folds, plan.cpus_per_worker, plan.torch_threads) == (2, 1.0, 1)
    assert plan.train_resources() == {"use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    assert "2 of 6 folds at once" in plan.line() and "1 torch thread" in plan.line()
    # one worker per fold: the fold trains in its trial, which reserves the worker's CPU
    assert plan.in_trial and plan.trial_resources() == {"CPU": 1.0}
    assert "each in its Tune trial's process" in plan.line()
    big = plan_folds(KFoldConfig(), 6, {"CPU": 16})
    assert (big.concurrent_folds, big.cpus_per_worker, big.torch_threads) == (6, 2.0, 2)
    one = plan_folds(KFoldConfig(), 6, {"CPU": 1})
    assert (one.concurrent_folds, one.cpus_per_worker) == (1, 1.0)
    ddp = plan_folds(KFoldConfig(workers_per_fold=2), 6, {"CPU": 8})
    assert (ddp.concurrent_folds, ddp.cpus_per_worker) == (4, 1.0)
    # DDP: a TorchTrainer per fold reserves the workers; its trial only its memory
    assert not ddp.in_trial and ddp.trial_resources() == FOLD_TRIAL_RESOURCES
    assert "2 TorchTrainer workers per fold" in ddp.line()
    gpu = plan_folds(KFoldConfig(), 6, {"CPU": 16, "GPU": 1})
    assert gpu.gpus_per_worker == pytest.approx(1 / 6) and gpu.concurrent_folds == 6
    assert gpu.trial_resources() == {"CPU": 2.0, "GPU": pytest.approx(1 / 6)}
    # the flags win
    given = plan_folds(KFoldConfig(cpus_per_worker=0.5, concurrent_folds=3), 6, {"CPU": 2})
    assert (given.concurrent_folds, given.cpus_per_worker, given.torch_threads) == (3, 0.5, 1)
    assert plan_folds(KFoldConfig(concurrent_folds=9), 6, {"CPU": 2}).concurrent_folds == 6
    with pytest.raises(ValueError, match="has no GPU"):
        plan_folds(KFoldConfig(gpus_per_fold=0.5), 6)
    with pytest.raises(ValueError, match="--cpus-per-worker 0"):
        plan_folds(KFoldConfig(cpus_per_worker=0), 6, {"CPU": 2})


def _single_fold_sweep(tmp_path, fold=2):
    """A best.json as jobs/tune_adamw.py writes it without --nested."""
    best = tmp_path / "best.json"
    search = {"fold": fold, "fit_actors": [9, 10], "val_actors": [11, 12], "test_actors": [5]}
    best.write_text(json.dumps({"params": {"lr_encoder": 3e-5}, "val_uar": 0.4, "fold": fold,
                                "search": search}))  # fmt: skip
    return best


def test_single_fold_sweep_params_are_refused(tmp_path):
    best = _single_fold_sweep(tmp_path)
    with pytest.raises(ValueError, match=r"outer fold 2 only.*tune_adamw.py --nested"):
        train_config_for(KFoldConfig(params=str(best)), 1)
    with pytest.raises(ValueError, match="--allow-leaky-params"):
        params_provenance(KFoldConfig(params=str(best)))
    allowed = KFoldConfig(params=str(best), allow_leaky_params=True)
    assert train_config_for(allowed, 1).lr_encoder == 3e-5
    provenance = params_provenance(allowed)
    assert provenance["leaky"] is True and provenance["nested"] is False
    assert provenance["file"] == str(best.resolve()) and provenance["tuned_on_fold"] == 2
    assert provenance["tuned_on"] == {"fit_actors": [9, 10], "val_actors": [11, 12]}
    # summary.md says so in bold, summary.json carries it
    doc = summary.build_summary(
        [{"fold": 1, "test_actors": [1], "n_test": 1,
          "wav2vec2": {"accuracy": 1.0, "uar": 1.0, "macro_f1": 1.0}}],
        pd.DataFrame([{"path": "a.wav", "actor": 1, "fold": 1, "true_label": "calm",
                       "pred_label": "calm", "model": "wav2vec2"}]),
        ["neutral", "calm"],
        summary.RunInfo(models={"wav2vec2": "demo"}, params_provenance=provenance),
    )  # fmt: skip
    assert doc["params_provenance"] == provenance
    markdown = summary.format_markdown(doc)
    assert f"- **SSL training settings from {best.resolve()}: LEAKY" in markdown


def test_nested_params_provenance_names_the_speakers_per_fold(tmp_path):
    best = tmp_path / "best.json"
    per_fold = {
        str(k): {"params": {}, "val_uar": 0.3,
                 "search": {"fold": k, "fit_actors": [k + 10], "val_actors": [k + 20]}}
        for k in (1, 2)
    }  # fmt: skip
    best.write_text(json.dumps({"per_fold": per_fold, "note": "nested"}))
    provenance = params_provenance(KFoldConfig(params=str(best)))
    assert provenance["nested"] is True and provenance["leaky"] is False
    assert provenance["tuned_on"] == {
        "1": {"fit_actors": [11], "val_actors": [21]},
        "2": {"fit_actors": [12], "val_actors": [22]},
    }
    assert params_provenance(KFoldConfig()) is None


def test_gpu_rule_gives_ddp_workers_whole_distinct_gpus():
    assert gpus_per_worker(0.0, 4) == 0.0
    assert gpus_per_worker(0.25, 1) == 0.25  # one worker per fold may share a GPU
    assert gpus_per_worker(2.0, 2) == 1.0
    assert gpus_per_worker(4.0, 2) == 2.0
    for gpus, workers in ((0.5, 2), (1.0, 2), (3.0, 2), (2.5, 1 + 1)):
        with pytest.raises(ValueError, match="whole GPUs of its own"):
            gpus_per_worker(gpus, workers)


def test_refit_is_passed_on_and_the_summary_says_what_each_variant_trained_on():
    cfg = KFoldConfig(train=study_train_config(refit=True))
    train_cfgs = {k: train_config_for(cfg, k) for k in range(1, 7)}
    assert train_cfgs[1].refit is True and train_config_for(KFoldConfig(), 1).refit is False
    refit = trained_on(cfg, ravdess_protocol())
    plain = trained_on(KFoldConfig(), ravdess_protocol())
    for k in map(str, range(1, 7)):
        test = set(range(4 * int(k) - 3, 4 * int(k) + 1))
        assert set(refit["svm"]["per_fold"][k]) == set(range(1, 25)) - test
        assert refit["wav2vec2"]["per_fold"][k] == refit["svm"]["per_fold"][k]
        assert len(plain["wav2vec2"]["per_fold"][k]) == 16
        assert set(plain["wav2vec2"]["per_fold"][k]) < set(refit["svm"]["per_fold"][k])
    assert "--refit" in refit["wav2vec2"]["description"]
    assert "never trained on" in plain["wav2vec2"]["description"]


def test_folds_with_their_own_encoder_get_their_own_feature_cache(tmp_path, monkeypatch):
    """After TAPT every fold's CNN differs: one shared cache (built from fold 1's model) made
    folds 2-6 stop with "the feature cache was not made by this model's frozen part"."""
    import dataclasses

    from ser_ray.distributed import feature_cache
    from ser_ray.distributed.fold_inputs import FoldInputs, fold_inputs_per_fold
    from ser_ray.training.config import TrainConfig

    built = []

    def fake_cache(features_dir, cache_root, *, train_config, use_gpu):
        built.append(train_config.model)
        key = f"cnn-{train_config.model}"
        return feature_cache.FeatureCache(tmp_path / key, "cnn", key, 10)

    monkeypatch.setattr(feature_cache, "build_feature_cache", fake_cache)
    base = TrainConfig(model="demo")
    tapt = {k: dataclasses.replace(base, model=f"tapt{k}") for k in (1, 2, 3)}
    inputs = fold_inputs_per_fold(tmp_path / "features", tapt, tmp_path)
    assert built == ["tapt1", "tapt2", "tapt3"]
    assert {k: v.feature_cache_key for k, v in inputs.items()} == {
        1: "cnn-tapt1",
        2: "cnn-tapt2",
        3: "cnn-tapt3",
    }
    built.clear()
    shared = fold_inputs_per_fold(tmp_path / "features", dict.fromkeys((1, 2, 3), base), tmp_path)
    assert built == ["demo"] and len({v.source for v in shared.values()}) == 1
    uncached = dataclasses.replace(base, use_feature_cache=False)
    assert fold_inputs_per_fold(tmp_path / "features", {1: uncached}, tmp_path)[1] == FoldInputs(
        source=str(tmp_path / "features"), input_kind="waveform", feature_cache_key=None
    )


def test_a_fold_job_hands_each_fold_one_typed_work_that_survives_pickling():
    """What a fold trial hands its training (FoldWork): the fold's own settings and inputs,
    the protocol object, its TensorBoard folder; pickled as Ray sends it, it comes back equal;
    its clips must be counted (fold_data) before a worker opens them."""
    import pickle

    from ser_ray.distributed.fold_inputs import FoldInputs
    from ser_ray.distributed.fold_trainer import open_fold_clips
    from ser_ray.distributed.ssl_folds import FoldJob
    from ser_ray.training.config import TrainConfig

    protocol = ravdess_protocol(n_val_speakers=2)
    cfgs = {k: TrainConfig(seed=k, n_val_speakers=2) for k in (1, 2)}
    inputs = {k: FoldInputs(f"/features/{k}", "waveform", None) for k in (1, 2)}
    job = FoldJob(
        variant="wavlm+probe",
        protocol=protocol,
        train_configs=cfgs,
        inputs=inputs,
        tensorboard_dir="/run/tensorboard",
    )
    work = job.work(2, progress_key="fold/t2")
    assert (work.train, work.inputs, work.fold) == (cfgs[2], inputs[2], 2)
    assert work.protocol.split(2) == protocol.split(2)
    assert work.log_dir == "/run/tensorboard/wavlm+probe/fold_2"
    assert (work.variant, work.progress_key) == ("wavlm+probe", "fold/t2")
    assert pickle.loads(pickle.dumps(work)) == work
    with pytest.raises(ValueError, match="fold 2: its clips were not counted"):
        open_fold_clips(work, {}, None)


def test_variant_names_of_ssl_families():
    names = "svm, wav2vec2,wavlm+spknorm+probe, hubert+probe"
    variants = parse_variants(names)
    assert [v.name for v in variants] == ["svm", "wav2vec2", "wavlm+probe+spknorm", "hubert+probe"]
    assert [(v.is_ssl, v.probe, v.speaker_norm) for v in variants] == [
        (False, False, False), (True, False, False), (True, True, True), (True, True, False)
    ]  # fmt: skip
    assert variants[2].describe()["mode"].startswith("probe: frozen encoder")
    assert variants[1].describe() == {
        "family": "wav2vec2",
        "mode": "fine-tuned: the encoder (its CNN frozen) and the head trained together",
        "normalisation": "none",
    }
    with pytest.raises(ValueError, match=r"needs \+probe \(wav2vec2\+probe\+spknorm\)"):
        parse_variant("wav2vec2+spknorm")
    with pytest.raises(ValueError, match="unknown option"):
        parse_variant("wavlm+egemaps")
    with pytest.raises(ValueError, match="given twice"):
        parse_variants("wavlm+probe,wavlm+probe")


def test_an_svm_on_ssl_features_takes_wav2vec2s_encoder_or_a_plain_models_of_any_family(
    encoders,
):
    from ser_ray.study.encoders import encoder_of

    ssl, spknorm = parse_variants("svm+ssl,svm+spknorm+ssl")
    assert (ssl.feature_set, ssl.is_ssl, ssl.uses_encoder, ssl.speaker_norm) == (
        "ssl", False, True, False
    )  # fmt: skip
    assert spknorm.name == "svm+ssl+spknorm" and spknorm.speaker_norm
    assert not parse_variant("svm+spknorm").uses_encoder
    with pytest.raises(ValueError, match=r"\+ssl takes the encoder's pooled layers alone"):
        parse_variant("svm+mfcc+ssl")
    assert encoder_of(KFoldConfig(), ssl) == "demo"
    assert encoder_of(KFoldConfig(data_dir="/d"), ssl) == "facebook/wav2vec2-base"
    wavlm = str(encoders["wavlm-base-plus"])
    given = KFoldConfig(train=study_train_config(model=f"{wavlm},hubert=h"))
    assert encoder_of(given, ssl) == wavlm
    check_model_reachable(wavlm, None)  # an SVM takes an encoder of any SSL family


def test_only_the_flags_that_ask_for_resources_make_a_joined_cluster_wait():
    from ser_ray.distributed.resources import asked_resources

    assert asked_resources(KFoldConfig(), 6) == (0.0, 0.0)  # the plan fits what it finds
    assert asked_resources(KFoldConfig(concurrent_folds=3), 6) == (3.0, 0.0)
    assert asked_resources(KFoldConfig(gpus_per_fold=0.5), 6) == (6.0, 3.0)
    ddp = KFoldConfig(concurrent_folds=2, workers_per_fold=2, cpus_per_worker=4, gpus_per_fold=2)
    assert asked_resources(ddp, 6) == (16.0, 4.0)


def test_storage_path_is_a_deprecated_alias_and_tune_state_lives_in_the_run_location(caplog):
    from ser_ray.study.kfold import _storage_path

    assert _storage_path(KFoldConfig(), "s3://b/run") == "s3://b/run/ray"
    assert not caplog.records
    given = _storage_path(KFoldConfig(storage_path="s3://b/state/"), "s3://b/run")
    assert given == "s3://b/state"
    assert "--storage-path is deprecated" in caplog.text
