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
    assert parse_args(["--dataset", "mnist", "--data-dir", "/else"]).data_dir == "/else"


def test_a_tilde_the_shell_left_means_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_args(["--out=~/runs/a", "--compile-cache=~/.cache/xla"])
    assert (cfg.out, cfg.compile_cache) == (f"{tmp_path}/runs/a", f"{tmp_path}/.cache/xla")
    assert parse_args(["--compile-cache", "off"]).compile_cache == "off"


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
    (["--norm", "ghost", "--virtual-batch-size", "1"], "ghost batches of at least 2 examples"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be at least 1"),
    (["--bn-momentum", "1"], "--bn-momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32), got 4294967296"),
    (["--epochs", "99999999999"], "--epochs must be at most 2147483647"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    # Finite in Python, infinite in the float32 the steps compute in.
    (["--lr", "1e39"], "--lr must be at most 3.4e+38"),
    (["--weight-decay", "1e39"], "--weight-decay must be at most 3.4e+38"),
    (["--bn-group-size", "0"], "--bn-group-size must be at least 1"),
    (["--num-processes", "0"], "--num-processes must be at least 1"),
    (["--no-such-flag"], "unrecognized arguments"),
    # An unset shell variable (--out "$RUN"): not the current directory.
    (["--out", ""], "--out needs a folder"),
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


def test_largest_seed_and_epochs_are_accepted():
    cfg = parse_args(["--seed", str(2**32 - 1), "--epochs", str(config.MAX_STEPS)])
    assert (cfg.seed, cfg.epochs) == (2**32 - 1, 2**31 - 1)


@pytest.mark.parametrize("argv, fragment", [
    (["--activation", "relu"], "--activation only applies to --model mlp, and this run uses "
                               "--model cnn; drop --activation"),
    (["--model", "resnet", "--mlp-depth", "2"], "--mlp-depth only applies to --model mlp"),
    (["--mlp-width", "50"], "--mlp-width only applies to --model mlp"),
    (["--virtual-batch-size", "8"], "--virtual-batch-size only applies to --norm ghost, and "
                                    "this run uses --norm batch"),
    (["--norm", "layer", "--bn-momentum", "0.5"], "--bn-momentum only applies to --norm batch, "
                                                  "ghost or renorm"),
    (["--norm", "none", "--bn-momentum", "0.5"], "drop --bn-momentum"),
    (["--dataset", "mnist", "--base-url", "http://mirror/"], "--base-url only applies with "
                                                             "--download"),
    (["--data-dir", "/data"], "--data-dir only applies to --dataset mnist and fashion-mnist"),
])
def test_typed_options_the_run_would_ignore_are_refused(argv, fragment):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv", [
    ["--model", "mlp", "--activation", "relu", "--mlp-depth", "2", "--mlp-width", "50"],
    ["--norm", "ghost", "--virtual-batch-size", "8"],
    ["--norm", "renorm", "--bn-momentum", "0.5"],
    ["--dataset", "fashion-mnist", "--data-dir", "/data", "--download", "--base-url", "http://m/"],
])
def test_typed_options_that_apply_are_accepted(argv):
    parse_args(argv)


def test_configs_built_in_code_keep_any_value():
    cfg = config.resolve(config.Config(norm="layer", virtual_batch_size=8, bn_momentum=0.5,
                                       activation="relu", base_url="http://m/"))
    assert (cfg.virtual_batch_size, cfg.bn_momentum) == (8, 0.5)


def test_help_shows_the_dataset_defaults_and_ranges(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the checked phrases
    text = config.build_parser().format_help()
    for key in ("epochs", "batch_size", "lr"):
        for name, defaults in config.DATASET_DEFAULTS.items():
            assert f"{defaults[key]:g} on {name}" in text
    assert "up to P pixels (0 to 4)" in text
    for url in config.DEFAULT_BASE_URL.values():
        assert url in text
