"""``python -m train``: parse the command line, run, turn known errors into one line."""

from __future__ import annotations

import sys

from train.config import Config, ConfigError, explicit_args, resolve


def main(argv=None) -> int:
    try:
        explicit = explicit_args(argv)
        cfg = resolve(Config(**explicit))  # cheap checks before importing jax
        from train import loop
        from train.checkpoint import CheckpointError
        from train.data import DataError
        if cfg.resume:
            cfg = loop.resume_config(explicit)
        code, _ = loop.run(cfg)
        return code
    except ConfigError as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m train: interrupted before training started; nothing to save",
              file=sys.stderr)
        return 130
    except Exception as e:
        # Known, user-fixable failures get one line; anything else is a bug
        # and keeps its traceback.
        known = ("DataError", "RunError", "CheckpointError")
        if type(e).__name__ in known and type(e).__module__.startswith("train."):
            print(f"python -m train: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
