"""What every job shares: flags built from the settings dataclasses, common flags, logging,
connecting to Ray."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ser_ray.common.errors import UserError
from ser_ray.distributed import cluster, console
from ser_ray.study.variants import Variant

T = TypeVar("T")
#: Ray Train's switch of its per-run preemption watcher (off on a local instance).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def reports_user_errors(
    main: Callable[[Sequence[str] | None], int],
) -> Callable[[Sequence[str] | None], int]:
    """A job's ``main`` whose user mistakes (:class:`ser_ray.common.errors.UserError`) end as
    one ``error: …`` line on stderr and exit status 2, as argparse's own do; with
    ``--verbose`` the traceback instead. Any other exception is a bug and keeps its
    traceback."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as error:
            if "--verbose" in (sys.argv[1:] if argv is None else argv):
                raise
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2

    return run


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: Any = None,
) -> list[str]:
    """Add a flag for each field of the settings dataclass ``cls`` (as HF's
    ``HfArgumentParser``); returns the field names it added, in field order.

    One rule for every job, so a flag is declared once and means the same everywhere:

    - the flag is ``--`` + the field name with ``-`` for ``_`` (``batch_size`` ->
      ``--batch-size``), unless the field's metadata names its own (``"flag": "--lr"`` for
      ``lr_encoder``); the parsed value's ``dest`` is always the field name;
    - the help is the field's ``metadata["help"]``, plus its default where it has one (not
      ``None``, not a bool); ``metadata["choices"]`` limits the values;
    - a bool flag flips the default: ``--name`` (store_true) for a field that defaults to
      False; for one that defaults to True, ``--no-name`` (or the metadata's flag) stores
      False, helped by ``metadata["flag_help"]`` where the field's help would not say what
      the flag does;
    - ``X | None`` takes an ``X``; ``tuple[X, ...]`` a comma-separated list; ``tuple[X, X]``
      two values.

    ``only`` / ``exclude`` pick the fields (a nested dataclass field is never added: add its
    own fields with another call). ``defaults`` is an instance holding a job's own defaults
    (default: ``cls()``).
    """
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    chosen = set(only) if only is not None else None
    added = []
    for field in dataclasses.fields(cls):
        name = field.name
        if (chosen is not None and name not in chosen) or name in set(exclude):
            continue
        if dataclasses.is_dataclass(_without_none(hints[name])):
            continue
        flag, kwargs = _flag(field, hints[name], getattr(defaults, name))
        parser.add_argument(flag, dest=name, **kwargs)
        added.append(name)
    unknown = (chosen or set()) - set(added)
    if unknown:
        raise ValueError(f"{cls.__name__} has no flag field(s) {sorted(unknown)}")
    return added


def _flag(field: dataclasses.Field, hint: Any, default: Any) -> tuple[str, dict[str, Any]]:
    """The flag of one field and its ``add_argument`` keywords (see :func:`add_dataclass_args`)."""
    dashed = field.name.replace("_", "-")
    help_text = field.metadata.get("help", "").replace("%", "%%")
    kwargs: dict[str, Any] = {"default": default}
    if "choices" in field.metadata:
        kwargs["choices"] = list(field.metadata["choices"])
    if hint is bool:
        kwargs["action"] = "store_false" if default else "store_true"
        flag = field.metadata.get("flag", f"--no-{dashed}" if default else f"--{dashed}")
        if default and "flag_help" in field.metadata:
            help_text = field.metadata["flag_help"].replace("%", "%%")
        return flag, {**kwargs, "help": help_text}
    hint = _without_none(hint)
    if typing.get_origin(hint) is tuple:
        item_types = typing.get_args(hint)
        if item_types[-1] is Ellipsis:  # comma-separated; argparse converts the string default
            kwargs.update(type=_comma_list(item_types[0]), default=",".join(map(str, default)))
        else:
            kwargs.update(type=item_types[0], nargs=len(item_types))
    else:
        kwargs["type"] = hint
    if default is not None:
        help_text = f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"
    flag = field.metadata.get("flag", f"--{dashed}")
    metavar = None if "choices" in kwargs else flag.lstrip("-").replace("-", "_").upper()
    return flag, {**kwargs, "help": help_text, "metavar": metavar}


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``; any other type as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _comma_list(item_type: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse ``type``: ``"a,b"`` -> ``(item_type("a"), item_type("b"))``."""

    def parse(text: str) -> tuple:
        return tuple(item_type(part) for part in text.split(",")) if text else ()

    parse.__name__ = f"comma-separated {getattr(item_type, '__name__', 'value')}s"
    return parse


def dataclass_from_args(
    args: argparse.Namespace, cls: type[T], defaults: T | None = None, **changes: Any
) -> T:
    """The settings dataclass ``cls`` back from parsed ``args``: every field whose name is an
    attribute of ``args`` (the ``dest`` of the flags :func:`add_dataclass_args` added, or of
    shared flags such as ``--out``), then ``changes`` (nested settings, values a job resolves
    itself), on top of ``defaults`` (a job's own defaults) or, without it, of ``cls``'s own
    (its constructor, so fields it derives in ``__post_init__`` are derived anew)."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    if defaults is None:
        return cls(**{**values, **changes})
    return dataclasses.replace(defaults, **{**values, **changes})


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--out",
        default=default_out,
        help="the run location: a local folder (one machine), a folder every node of the "
        "cluster mounts (NFS, EFS, a Kubernetes volume) or a URI (s3://bucket/run, gs://...) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny and fast: small demo corpus, few steps (for CI)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS as set by `ray job submit`, "
        "else start a local Ray instance)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs for a local Ray instance (default: all cores)",
    )
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="start Ray's dashboard with a local Ray instance (about 1 GB of memory and a few "
        "seconds of start-up; a cluster joined with --address keeps its own)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's own progress (Tune trial tables, Ray Data and Ray Train lines)",
    )


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` or ``--features`` (neither: the demo corpus); see features_for_job."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data-dir",
        help="the corpus (RAVDESS or CREMA-D folder, clip manifest CSV/JSONL): prepare its "
        "features into OUT/prepared first. Default (neither flag): the embedded demo corpus",
    )
    source.add_argument(
        "--features", help="a prepared features folder (the Parquet dataset of jobs/prepare.py)"
    )


def add_protocol_args(parser: argparse.ArgumentParser, defaults: Any = None) -> None:
    """The protocol's flags (``--folds``, ``--num-folds``, ``--label-map``, ``--protocol``);
    ``--merge-calm`` and ``--seed`` are the job's own, the validation speakers the training
    settings'."""
    from ser_ray.corpus.protocol import ProtocolSettings

    add_dataclass_args(
        parser,
        ProtocolSettings,
        exclude=("merge_calm", "n_val_speakers", "seed"),
        defaults=defaults,
    )


def add_svm_feature_args(parser: argparse.ArgumentParser) -> None:
    """``--svm-features`` and ``--speaker-norm``: what the SVM is trained on."""
    parser.add_argument(
        "--svm-features",
        choices=["mfcc", "egemaps", "mfcc+egemaps"],
        default="mfcc",
        help="SVM input: 80 MFCC statistics, 88 eGeMAPSv02 functionals (openSMILE), or both "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--speaker-norm",
        action="store_true",
        help="z-normalise each clip's features over its own speaker's clips (unlabelled; "
        "transductive for the test speakers, as in Pepino et al. 2021)",
    )


def svm_variant_name(args: argparse.Namespace) -> str:
    """The variant name (``svm``, ``svm+egemaps+spknorm``, …) of the SVM flags."""
    return Variant("svm", feature_set=args.svm_features, speaker_norm=args.speaker_norm).name


def setup_logging(verbose: bool = False) -> None:
    """Our log lines to stderr (INFO; DEBUG with ``verbose``), other libraries' warnings only
    (their INFO lines with ``verbose``, e.g. matplotlib's font cache); how much Ray prints
    (see :mod:`ser_ray.distributed.console`)."""
    console.configure(verbose)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for ours in ("ser_ray", "benchmarks"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)


def init_ray(
    address: str | None = None, num_cpus: int | None = None, dashboard: bool = False
) -> None:
    """Join ``address`` or ``$RAY_ADDRESS``; otherwise start a fresh local instance (never a
    stale cluster named in /tmp/ray), with Ray's dashboard only when ``dashboard``, and
    without Ray Train's preemption watcher (an actor per training run that watches for nodes
    being drained: a local instance has one node, whose loss ends the job anyway)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **console.ray_init_kwargs())
    else:
        # read by Train's controllers, which inherit this process's environment
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            **console.ray_init_kwargs(),
        )
    console.quiet_ray_data()


def check_where_files_live(out: str, corpus: str | None = None) -> None:
    """On a cluster of several nodes, refuse (one line) a run location ``out`` or a
    ``corpus`` that some node cannot see, before any work
    (:func:`ser_ray.distributed.cluster.check_reachable`); nothing on one machine."""
    readable = {"the corpus": corpus} if corpus else {}
    cluster.check_reachable(writable={"--out": out}, readable=readable)
