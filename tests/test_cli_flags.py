"""Flags built from the settings dataclasses (ser_ray.cli.add_dataclass_args): one flag per
field with its help and default, parse -> dataclass round trips, one meaning per flag."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from ser_ray import cli
from ser_ray.corpus.protocol import SCHEMES, ProtocolSettings
from ser_ray.features.featurize import FeatureConfig
from ser_ray.study.config import KFoldConfig, study_train_config
from ser_ray.sweeps.adamw import SweepConfig, sweep_train_config
from ser_ray.training.config import TrainConfig
from ser_ray.training.pretrain import PretrainConfig

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@dataclasses.dataclass
class Toy:
    size: int = dataclasses.field(default=3, metadata={"help": "how many (100% sure)"})
    rate: float | None = dataclasses.field(default=None, metadata={"help": "a rate"})
    lr_encoder: float = dataclasses.field(default=1e-3, metadata={"help": "peak", "flag": "--lr"})
    verbose: bool = dataclasses.field(default=False, metadata={"help": "talk"})
    cache: bool = dataclasses.field(default=True, metadata={"help": "use the cache"})
    names: tuple[str, ...] = dataclasses.field(default=("a", "b"), metadata={"help": "names"})
    pair: tuple[float, float] = dataclasses.field(default=(0.9, 0.99), metadata={"help": "two"})
    kind: str = dataclasses.field(
        default="x", metadata={"help": "which kind", "choices": ["x", "y"]}
    )


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"
    }


def _job_parser(name: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_a_flag_per_field_with_its_help_and_default():
    parser = argparse.ArgumentParser()
    added = cli.add_dataclass_args(parser, Toy)
    assert added == [f.name for f in dataclasses.fields(Toy)]
    actions = _actions(parser)
    assert set(actions) == {
        "--size", "--rate", "--lr", "--verbose", "--no-cache", "--names", "--pair", "--kind",
    }  # fmt: skip
    assert actions["--lr"].dest == "lr_encoder"  # a flag named in the metadata
    assert actions["--size"].help == "how many (100%% sure) (default: %(default)s)"
    assert "how many (100% sure) (default: 3)" in " ".join(parser.format_help().split())
    assert actions["--rate"].help == "a rate" and actions["--rate"].type is float  # X | None
    assert actions["--verbose"].default is False and actions["--no-cache"].default is True
    assert actions["--kind"].choices == ["x", "y"] and actions["--pair"].nargs == 2
    with pytest.raises(ValueError, match=r"no flag field\(s\) \['nope'\]"):
        cli.add_dataclass_args(argparse.ArgumentParser(), Toy, only=("size", "nope"))


def test_parse_to_dataclass_round_trip():
    parser = argparse.ArgumentParser()
    cli.add_dataclass_args(parser, Toy)
    assert cli.dataclass_from_args(parser.parse_args([]), Toy) == Toy()
    args = parser.parse_args(
        ["--size", "5", "--rate", "0.5", "--lr", "2e-4", "--verbose", "--no-cache",
         "--names", "c,d,e", "--pair", "0.8", "0.9", "--kind", "y"]
    )  # fmt: skip
    assert cli.dataclass_from_args(args, Toy) == Toy(
        5, 0.5, 2e-4, True, False, ("c", "d", "e"), [0.8, 0.9], "y"
    )
    # a job's own defaults come back as they were, changes on top
    own = Toy(size=7)
    parser = argparse.ArgumentParser()
    cli.add_dataclass_args(parser, Toy, only=("size", "kind"), defaults=own)
    assert cli.dataclass_from_args(parser.parse_args([]), Toy, own, rate=1.0) == Toy(7, 1.0)


@pytest.mark.parametrize(
    ("job", "build"),
    [
        ("kfold", lambda a: cli.dataclass_from_args(
            a, KFoldConfig, train=cli.dataclass_from_args(a, TrainConfig, study_train_config()))),
        ("tune_adamw", lambda a: cli.dataclass_from_args(
            a, SweepConfig, train=cli.dataclass_from_args(a, TrainConfig, sweep_train_config()))),
        ("pretrain", lambda a: cli.dataclass_from_args(a, PretrainConfig, model="demo-random")),
        ("prepare", lambda a: cli.dataclass_from_args(a, FeatureConfig)),
    ],
)  # fmt: skip
def test_every_job_without_flags_gives_its_configs_defaults(job, build):
    expected = {
        "kfold": KFoldConfig(),
        # the sweep job's --model is the pre-trained demo encoder (resolved before the search)
        "tune_adamw": SweepConfig(train=sweep_train_config(model="demo")),
        "pretrain": PretrainConfig(),
        "prepare": FeatureConfig(),
    }[job]
    assert build(_job_parser(job).parse_args([])) == expected


def test_kfold_flags_reach_the_study_and_its_training_settings():
    args = _job_parser("kfold").parse_args(
        ["--lr", "1e-4", "--epochs", "3", "--merge-calm", "--refit", "--folds", "emobox",
         "--variants", "svm,wav2vec2", "--model", "demo-random"]
    )  # fmt: skip
    train = cli.dataclass_from_args(args, TrainConfig, study_train_config())
    protocol = cli.dataclass_from_args(args, ProtocolSettings)
    cfg = cli.dataclass_from_args(args, KFoldConfig, train=train, protocol=protocol)
    assert (train.lr_encoder, train.epochs, train.merge_calm, train.refit) == (1e-4, 3, True, True)
    assert cfg.protocol_settings(4).merge_calm and cfg.protocol_settings(4).n_val_speakers == 4
    assert (cfg.protocol.folds, cfg.variants, cfg.model_for("wav2vec2")) == (
        "emobox",
        ("svm", "wav2vec2"),
        "demo-random",
    )
    assert train.early_stopping_patience == TrainConfig().early_stopping_patience


def test_the_same_flag_means_the_same_on_every_job():
    parsers = {job: _actions(_job_parser(job)) for job in ("kfold", "tune_adamw", "prepare",
                                                            "tune_svm", "pretrain")}  # fmt: skip

    def meaning(action: argparse.Action) -> tuple:
        return (
            action.dest,
            action.help.split(" (default: %(default)s)")[0],
            action.type,
            tuple(action.choices or ()),
            type(action).__name__,
        )

    shared = {
        "--folds": ("kfold", "tune_adamw", "tune_svm"),
        "--num-folds": ("kfold", "tune_adamw", "tune_svm"),
        "--label-map": ("kfold", "tune_adamw", "tune_svm"),
        "--protocol": ("kfold", "tune_adamw", "tune_svm"),
        "--epochs": ("kfold", "tune_adamw", "pretrain"),
        "--batch-size": ("kfold", "tune_adamw", "pretrain"),
        "--seed": ("kfold", "tune_adamw", "pretrain"),
        "--merge-calm": ("kfold", "tune_adamw"),
        "--model": ("kfold", "tune_adamw"),
    }
    for flag, jobs in shared.items():
        meanings = {job: meaning(parsers[job][flag]) for job in jobs}
        assert len(set(meanings.values())) == 1, (flag, meanings)
    assert parsers["kfold"]["--folds"].choices == list(SCHEMES)
    assert "--folds" not in parsers["prepare"]  # features do not depend on the folds
    # the peak learning rate of the encoder, by either loop's name for it
    assert (
        parsers["kfold"]["--lr"].dest == "lr_encoder" and parsers["pretrain"]["--lr"].dest == "lr"
    )


def test_renamed_and_removed_flags():
    kfold = _job_parser("kfold")
    assert "--models" not in {o for a in kfold._actions for o in a.option_strings}
    pretrain = _job_parser("pretrain")
    assert pretrain.parse_args(["--data-dir", "pool"]).data_dir == "pool"
    assert "--data" not in {o for a in pretrain._actions for o in a.option_strings}
