import dataclasses

import pytest

from train import config
from train.config import ConfigError, parse_args


def test_defaults_are_the_digits_defaults(monkeypatch):
    monkeypatch.delenv("JAXBN_DATA", raising=False)
    cfg = parse_args([])
    assert (cfg.dataset, cfg.model, cfg.norm, cfg.optimizer, cfg.schedule) == (
        "digits", "cnn", "batch", "adam", "cosine")
    d = config.DATASET_DEFAULTS["digits"]
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (d["epochs"], d["batch_size"], d["lr"])
    assert cfg.out == "runs/digits-cnn-batch-seed0"
    assert cfg.data_dir is None


def test_dataset_defaults_differ_and_explicit_values_win():
    mnist = parse_args(["--dataset", "mnist"])
    assert mnist.epochs == config.DATASET_DEFAULTS["mnist"]["epochs"]
    assert mnist.batch_size != parse_args([]).batch_size
    cfg = parse_args(["--dataset", "mnist", "--epochs", "7", "--batch-size", "64", "--lr", "0.1"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (7, 64, 0.1)


def test_data_dir_falls_back_to_environment(monkeypatch):
    monkeypatch.setenv("JAXBN_DATA", "/some/where")
    assert parse_args([]).data_dir == "/some/where"
    assert parse_args(["--data-dir", "/else"]).data_dir == "/else"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_args([]).epochs = 3


@pytest.mark.parametrize("argv, fragment", [
    (["--norm", "bogus"], "invalid choice: 'bogus'"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--model", "vit"], "invalid choice: 'vit'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--epochs", "two"], "expected an integer"),
    (["--lr", "0"], "--lr must be positive"),
    (["--devices", "0"], "--devices must be at least 1"),
    (["--batch-size", "30", "--devices", "4"], "not divisible by --devices 4"),
    (["--batch-size", "1"], "at least 2 examples"),
    (["--norm", "ghost", "--batch-size", "40", "--virtual-batch-size", "16"], "divide evenly"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be at least 1"),
    (["--bn-momentum", "1"], "--bn-momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--bn-group-size", "0"], "--bn-group-size must be at least 1"),
    (["--num-processes", "0"], "--num-processes must be at least 1"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_values_raise_one_line_config_errors(argv, fragment):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_batch_size_one_is_fine_without_batch_statistics():
    assert parse_args(["--batch-size", "1", "--norm", "layer"]).batch_size == 1


def test_training_dict_holds_what_changes_the_computation():
    cfg = parse_args(["--seed", "3", "--out", "/tmp/x"])
    assert cfg.training_dict()["seed"] == 3
    assert "out" not in cfg.training_dict() and "data_dir" not in cfg.training_dict()


def test_augment_shift_defaults_per_dataset():
    assert parse_args([]).augment_shift == 0
    assert parse_args(["--dataset", "mnist"]).augment_shift == 2
    assert parse_args(["--dataset", "mnist", "--augment-shift", "0"]).augment_shift == 0
    with pytest.raises(ConfigError, match="--augment-shift must be 0 to 4"):
        parse_args(["--augment-shift", "9"])
