"""Training package for jaxbn: ``python -m train`` (see ``python -m train --help``).

Modules: ``config`` (CLI -> Config), ``data`` (digits, MNIST, Fashion-MNIST),
``models`` (CNN, MLP, ResNet with a swappable normalization), ``steps`` (pure
jitted train/eval steps), ``checkpoint`` (atomic, checksummed), ``loop`` (the
run: output folder, resume, signals), ``plots``.
"""

from train.config import Config, ConfigError, parse_args

__all__ = ["Config", "ConfigError", "parse_args", "main"]


def main(argv=None) -> int:
    from train.__main__ import main as _main
    return _main(argv)
