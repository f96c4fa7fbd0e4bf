"""Console entry points: ``fipo-train --config FILE [key.sub=value ...] [--dry-run] [--resume R]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_fipo.config import ConfigError, load_config, save_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fipo-train", description="Train with FIPO / DAPO / GRPO."
    )
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and the parallel layout, print it with a memory estimate, exit",
    )
    parser.add_argument(
        "--resume", help="auto (newest complete checkpoint), disable, or a checkpoint directory"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def train_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"trainer.resume={args.resume}")
    try:
        config = load_config(args.config, overrides)
        if args.dry_run:
            from megatron_fipo.cluster.layout import describe

            report, _ = describe(config)
            print(f"{args.config}\n{report}\nlayout OK")
            return 0
    except (ConfigError, ValueError) as error:
        print(f"fipo-train: {error}", file=sys.stderr)
        return 2
    from megatron_fipo.components import build_components
    from megatron_fipo.trainer import Trainer

    output = Path(config.trainer.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    save_config(config, output / "config.yaml")
    parts = build_components(config, quiet=args.quiet)
    try:
        Trainer(config, parts).fit()
    finally:
        parts.close()
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
