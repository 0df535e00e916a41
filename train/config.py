"""Run configuration: a frozen dataclass and the command-line parser.

This module imports neither jax nor flax so that bad command lines are
rejected in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

DATASETS = ("digits", "mnist", "fashion-mnist")
MODELS = ("cnn", "mlp", "resnet")
NORMS = ("batch", "none", "layer", "group", "ghost", "renorm")
OPTIMIZERS = ("adam", "sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
# Normalizations that compute statistics across the batch.
BATCH_STAT_NORMS = ("batch", "ghost", "renorm")

# Defaults that depend on the dataset: the 8x8 digits set is tiny (1437
# training images), so it needs many short epochs and small batches; MNIST
# has 60000 images, so a few epochs of larger batches suffice. Random shifts
# of MNIST digits keep the CNN from memorising the training set in longer
# runs (100% train accuracy and 99.27% test after 10 epochs without).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 8, "batch_size": 32, "lr": 3e-3, "augment_shift": 0},
    "mnist": {"epochs": 2, "batch_size": 128, "lr": 2e-3, "augment_shift": 2},
    "fashion-mnist": {"epochs": 4, "batch_size": 128, "lr": 2e-3, "augment_shift": 0},
}

# Where --download fetches each dataset's files from, unless --base-url says.
DEFAULT_BASE_URL = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

# The step counters (optimizer count, schedule, bad-step count) are int32.
MAX_STEPS = 2**31 - 1
# Seeds become uint32 PRNG keys.
SEED_LIMIT = 2**32
# The largest float32: the steps compute in float32, where a larger --lr or
# --weight-decay is infinite (a NaN learning rate at the first warmup step).
FLOAT32_MAX = 3.4028234663852886e38

# Fields that change what is computed. Resuming a run with a different value
# for any of these would not reproduce the uninterrupted run.
TRAINING_FIELDS = (
    "dataset", "model", "norm", "epochs", "batch_size", "lr", "seed",
    "devices", "optimizer", "weight_decay", "schedule", "mlp_depth",
    "mlp_width", "activation", "limit_train", "bn_momentum",
    "virtual_batch_size", "bn_group_size", "augment_shift",
)

# Set per launch, never taken from a checkpoint: how this process joins a
# multi-process run (the coordinator's port and the process id change) and
# where it keeps compiled programs.
LAUNCH_FIELDS = ("coordinator", "num_processes", "process_id", "compile_cache")


class ConfigError(ValueError):
    """A command line or configuration that cannot be run."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run.

    ``None`` for ``epochs``, ``batch_size``, ``lr``, ``augment_shift`` and
    ``out`` means "the default for this dataset", for ``devices`` one per
    process and for ``bn_group_size`` all devices; :func:`resolve` fills
    them in.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    norm: str = "batch"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    out: str | None = None
    resume: bool = False
    devices: int | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    download: bool = False
    base_url: str | None = None
    max_bad_steps: int = 10
    mlp_depth: int = 3
    mlp_width: int = 100
    activation: str = "sigmoid"
    limit_train: int | None = None
    bn_momentum: float = 0.9
    virtual_batch_size: int = 16
    bn_group_size: int | None = None
    augment_shift: int | None = None
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    compile_cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_dict(self) -> dict[str, Any]:
        """The fields that must match for a resumed run to be exact."""
        return {k: getattr(self, k) for k in TRAINING_FIELDS}


def default_out_dir(cfg: Config) -> str:
    return os.path.join("runs", f"{cfg.dataset}-{cfg.model}-{cfg.norm}-seed{cfg.seed}")


def resolve(cfg: Config, *, check: bool = True) -> Config:
    """Fill dataset-dependent defaults and (unless ``check`` is false) check value ranges.

    ``check=False`` serves ``--resume``: the command line alone lacks the
    checkpointed settings its values must be checked against (``--batch-size
    1`` is fine for a layer-norm run, not for the default ``--norm batch``).
    """
    defaults = DATASET_DEFAULTS[cfg.dataset]
    cfg = dataclasses.replace(
        cfg,
        epochs=defaults["epochs"] if cfg.epochs is None else cfg.epochs,
        batch_size=defaults["batch_size"] if cfg.batch_size is None else cfg.batch_size,
        lr=defaults["lr"] if cfg.lr is None else cfg.lr,
        data_dir=cfg.data_dir if cfg.data_dir is not None else os.environ.get("JAXBN_DATA") or None,
        devices=cfg.num_processes if cfg.devices is None else cfg.devices,
        augment_shift=(defaults["augment_shift"] if cfg.augment_shift is None
                       else cfg.augment_shift),
    )
    if cfg.bn_group_size is None:
        cfg = dataclasses.replace(cfg, bn_group_size=cfg.devices)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=default_out_dir(cfg))
    # A shell leaves ~ alone in --out=~/runs: the folder meant is still the home one.
    cfg = dataclasses.replace(cfg, out=os.path.expanduser(cfg.out), compile_cache=(
        None if cfg.compile_cache is None else os.path.expanduser(cfg.compile_cache)))
    if check:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the fix for any out-of-range value."""
    choices = {
        "dataset": DATASETS, "model": MODELS, "norm": NORMS,
        "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "activation": ACTIVATIONS,
    }
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")
    # num_processes first: --devices defaults to it
    at_least_one = ("num_processes", "epochs", "batch_size", "devices", "max_bad_steps",
                    "mlp_depth", "mlp_width", "virtual_batch_size", "bn_group_size")
    for name in at_least_one:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.limit_train is not None and cfg.limit_train < 1:
        raise ConfigError(f"--limit-train must be at least 1, got {cfg.limit_train}")
    if cfg.epochs is not None and cfg.epochs > MAX_STEPS:
        raise ConfigError(f"--epochs must be at most {MAX_STEPS} (the step counter is a "
                          f"32-bit integer), got {cfg.epochs}")
    for name in ("lr", "weight_decay", "bn_momentum"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    for name in ("lr", "weight_decay"):
        value = getattr(cfg, name)
        if value is not None and value > FLOAT32_MAX:
            raise ConfigError(f"--{name.replace('_', '-')} must be at most {FLOAT32_MAX:.2g} "
                              f"(the largest float32), got {value}")
    if not cfg.weight_decay >= 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if not 0.0 <= cfg.bn_momentum < 1.0:
        raise ConfigError(f"--bn-momentum must be in [0, 1), got {cfg.bn_momentum}")
    if cfg.augment_shift is not None and not 0 <= cfg.augment_shift <= 4:
        raise ConfigError(f"--augment-shift must be 0 to 4 pixels, got {cfg.augment_shift}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.out == "":
        # Path("") is the current directory: the run would land among its files.
        raise ConfigError("--out needs a folder, got an empty path")
    if cfg.compile_cache is not None and not cfg.compile_cache.strip():
        raise ConfigError("--compile-cache needs a folder, or 'off' for no cache")
    _validate_parallel(cfg)
    if cfg.norm == "ghost" and cfg.virtual_batch_size < 2:
        raise ConfigError(
            f"--norm ghost needs ghost batches of at least 2 examples to estimate statistics; "
            f"raise --virtual-batch-size (got {cfg.virtual_batch_size})")
    if cfg.batch_size is not None:
        if cfg.batch_size % cfg.devices:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is not divisible by --devices {cfg.devices}; "
                "the global batch is split evenly across devices")
        if cfg.norm == "ghost" and (cfg.batch_size // cfg.devices) % cfg.virtual_batch_size:
            raise ConfigError(
                f"--norm ghost splits each device's batch of {cfg.batch_size // cfg.devices} "
                f"into ghost batches of --virtual-batch-size {cfg.virtual_batch_size}; pick "
                f"sizes that divide evenly")
        # Batch norms pool the statistics of each group of devices.
        pooled = cfg.batch_size // cfg.devices * cfg.bn_group_size
        if cfg.norm in BATCH_STAT_NORMS and pooled < 2:
            if cfg.devices == 1:
                raise ConfigError(
                    f"--norm {cfg.norm} needs at least 2 examples per batch to estimate "
                    f"statistics; raise --batch-size (got {cfg.batch_size})")
            raise ConfigError(
                f"--norm {cfg.norm} needs at least 2 examples for its statistics, and "
                f"--batch-size {cfg.batch_size} over --devices {cfg.devices} pools {pooled} "
                f"example per --bn-group-size {cfg.bn_group_size}; raise --batch-size or "
                f"--bn-group-size")


def _validate_parallel(cfg: Config) -> None:
    if cfg.devices is not None and cfg.bn_group_size is not None:
        if cfg.devices % cfg.bn_group_size:
            raise ConfigError(
                f"--bn-group-size {cfg.bn_group_size} does not divide --devices {cfg.devices}; "
                f"batch-norm groups must split the devices evenly")
        if cfg.bn_group_size < cfg.devices and cfg.norm not in BATCH_STAT_NORMS:
            raise ConfigError(
                f"--bn-group-size only applies to batch statistics, and --norm {cfg.norm} "
                f"has none; drop --bn-group-size")
    if cfg.num_processes == 1:
        if cfg.coordinator is not None or cfg.process_id != 0:
            raise ConfigError(
                "--coordinator and --process-id only apply with --num-processes 2 or more")
        return
    if cfg.coordinator is None:
        raise ConfigError(
            f"--num-processes {cfg.num_processes} needs --coordinator HOST:PORT, the address "
            f"of process 0 (the same on every process)")
    host, _, port = cfg.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--coordinator {cfg.coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ConfigError(
            f"--process-id {cfg.process_id} is not in 0..{cfg.num_processes - 1} "
            f"(--num-processes {cfg.num_processes})")
    if cfg.devices is not None and cfg.devices % cfg.num_processes:
        raise ConfigError(
            f"--devices {cfg.devices} is not a multiple of --num-processes "
            f"{cfg.num_processes}; every process contributes the same number of devices")


def check_typed_options(explicit: dict[str, Any], cfg: Config) -> None:
    """Refuse options typed on the command line that ``cfg`` would ignore.

    Only typed options: a Config built in code may carry any value, e.g. a
    virtual batch size for every norm.
    """
    ignored_unless = (
        (("activation", "mlp_depth", "mlp_width"), cfg.model == "mlp",
         f"to --model mlp, and this run uses --model {cfg.model}"),
        (("virtual_batch_size",), cfg.norm == "ghost",
         f"to --norm ghost, and this run uses --norm {cfg.norm}"),
        (("bn_momentum",), cfg.norm in BATCH_STAT_NORMS,
         f"to --norm {', '.join(BATCH_STAT_NORMS[:-1])} or {BATCH_STAT_NORMS[-1]}, and this "
         f"run uses --norm {cfg.norm}"),
        (("base_url",), cfg.download, "with --download, which this run does not use"),
        (("data_dir",), cfg.dataset in DEFAULT_BASE_URL,
         f"to --dataset {' and '.join(DEFAULT_BASE_URL)}, and this run uses --dataset "
         f"{cfg.dataset}"),
    )
    for names, applies, why in ignored_unless:
        for name in names:
            if name in explicit and not applies:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} only applies {why}; drop {flag}")


RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints", "config.json")


def check_out_dir(out: str, resume: bool) -> None:
    """Read-only checks on --out, before anything is loaded or created."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another --out")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is not a directory; choose another --out")
            break
    if not resume and path.is_dir():
        found = [m for m in RUN_MARKERS if (path / m).exists()]
        if found:
            raise ConfigError(
                f"--out {out} already holds a run ({found[0]}); pass --resume to continue "
                f"it or choose another --out")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise ConfigError(message)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _per_dataset(key: str) -> str:
    """'8 on digits, 2 on mnist, ...': a dataset-dependent default for --help."""
    return ", ".join(f"{DATASET_DEFAULTS[d][key]:g} on {d}" for d in DATASETS)


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS as default: the namespace then holds only what was typed, which
    # lets --resume take the rest from the checkpointed config.
    p = _Parser(
        prog="python -m train",
        description="Train a small image classifier with batch normalization (jaxbn).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--dataset", choices=DATASETS, help="default: digits (offline, scikit-learn)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding mnist/ and fashion-mnist/ (default: $JAXBN_DATA)")
    p.add_argument("--model", choices=MODELS, help="default: cnn")
    p.add_argument("--norm", choices=NORMS, help="normalization in every layer (default: batch)")
    p.add_argument("--epochs", type=_int, metavar="N", help=f"default: {_per_dataset('epochs')}")
    p.add_argument("--batch-size", type=_int, metavar="B",
                   help=f"default: {_per_dataset('batch_size')}")
    p.add_argument("--lr", type=_float, metavar="LR",
                   help=f"peak learning rate (default: {_per_dataset('lr')})")
    p.add_argument("--seed", type=_int, metavar="S", help="0 to 2**32 - 1 (default: 0)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: runs/<dataset>-<model>-<norm>-seed<S>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last complete checkpoint")
    p.add_argument("--devices", type=_int, metavar="N",
                   help="data-parallel over N devices in all, batch-norm statistics synced "
                        "across them (default: 1 per process)")
    p.add_argument("--bn-group-size", type=_int, metavar="G",
                   help="batch-norm statistics over groups of G devices instead of all "
                        "(default: all --devices)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0 for a multi-process run (jax.distributed)")
    p.add_argument("--num-processes", type=_int, metavar="P",
                   help="processes in a multi-process run (default: 1)")
    p.add_argument("--process-id", type=_int, metavar="I",
                   help="this process's index, 0..P-1; process 0 writes --out")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: adam")
    p.add_argument("--weight-decay", type=_float, metavar="WD", help="default: 0")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule (default: cosine, with linear warmup)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing or corrupt dataset files into --data-dir")
    p.add_argument("--base-url", metavar="URL",
                   help="where --download fetches from (default: " + ", ".join(
                       f"{url} for {name}" for name, url in DEFAULT_BASE_URL.items()) + ")")
    p.add_argument("--max-bad-steps", type=_int, metavar="K",
                   help="stop after K consecutive non-finite steps (default: 10)")
    p.add_argument("--mlp-depth", type=_int, metavar="D", help="hidden layers (default: 3)")
    p.add_argument("--mlp-width", type=_int, metavar="W", help="hidden units (default: 100)")
    p.add_argument("--activation", choices=ACTIVATIONS, help="mlp activation (default: sigmoid)")
    p.add_argument("--limit-train", type=_int, metavar="N",
                   help="train on the first N training examples only")
    p.add_argument("--augment-shift", type=_int, metavar="P",
                   help="shift training images by up to P pixels (0 to 4) at random "
                        f"(default: {_per_dataset('augment_shift')})")
    p.add_argument("--bn-momentum", type=_float, metavar="M",
                   help="running-statistics momentum, flax convention (default: 0.9)")
    p.add_argument("--virtual-batch-size", type=_int, metavar="V",
                   help="ghost batch size for --norm ghost (default: 16)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="keep compiled programs in DIR for later runs, which then skip most "
                        "of their compilation; 'off' for no cache (default: JAX's own "
                        "setting, on where JAX_COMPILATION_CACHE_DIR is set)")
    return p


def explicit_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse argv into a dict holding only the options that were given."""
    ns = build_parser().parse_args(argv)
    return vars(ns)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """argv -> resolved Config (dataset defaults filled in, values checked)."""
    explicit = explicit_args(argv)
    cfg = resolve(Config(**explicit))
    check_typed_options(explicit, cfg)
    return cfg
