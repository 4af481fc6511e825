"""How the main job resolves its settings and resources (no training)."""

import json

import pytest

from ser_ray.kfold import KFoldConfig, fold_resources, train_config_for


def test_model_default_depends_on_data():
    assert KFoldConfig().resolved_model() == "demo"
    assert KFoldConfig(data_dir="/data").resolved_model() == "facebook/wav2vec2-base"
    assert KFoldConfig(data_dir="/data", model="./local").resolved_model() == "./local"


def test_flags_override_params_file(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"params": {"lr_encoder": 3e-5, "weight_decay": 0.02,
                                           "betas": [0.9, 0.98]}, "val_uar": 0.4}))  # fmt: skip
    cfg = train_config_for(KFoldConfig(params=str(best), epochs=3))
    assert (cfg.lr_encoder, cfg.weight_decay, cfg.betas, cfg.epochs) == (3e-5, 0.02, (0.9, 0.98), 3)
    assert train_config_for(KFoldConfig(params=str(best), lr=1e-4)).lr_encoder == 1e-4
    assert train_config_for(KFoldConfig(smoke_test=True)).epochs == 1


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
    with pytest.raises(ValueError, match="models"):
        KFoldConfig(models=("svm", "bert"))


def test_fold_resources_share_the_cluster(ray_local):
    shared = fold_resources(KFoldConfig(), 6)
    # 2 CPUs: one stays free for Ray's own tasks, the other is split over six folds
    assert shared == {"use_gpu": False, "resources_per_worker": {"CPU": 0.16}}
    assert fold_resources(KFoldConfig(), 1)["resources_per_worker"] == {"CPU": 1.0}
    assert fold_resources(KFoldConfig(cpus_per_worker=0.5), 6)["resources_per_worker"] == {
        "CPU": 0.5
    }
    with pytest.raises(ValueError, match="has no GPU"):
        fold_resources(KFoldConfig(gpus_per_fold=0.5), 6)
