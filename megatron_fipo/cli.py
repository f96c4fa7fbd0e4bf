"""Console entry points: ``fipo-train --config FILE [key.sub=value ...] [--dry-run] [--resume R]``.

A run goes through three stages:

1. checks that need no Ray, in seconds: the config, the model checkpoint against it, the output
   directory (writable, not used by another run: an exclusive lock), the checkpoint to resume
   from (complete, files of the sizes its manifest says), the data, the reward function and the
   initial checkpoint. A user mistake found here is one line on stderr and exit status 2;
2. ``config.yaml`` is written (only now: a refused run changes nothing in the directory);
3. Ray, the workers and the loop. SIGTERM / SIGINT end the current step, save a checkpoint and
   exit 0 with a message; a second signal stops at once. A node that leaves the cluster ends
   the run with one line naming it and the checkpoint to resume from, exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_fipo.config import ConfigError, check_model_checkpoint, load_config, to_yaml

# Exceptions that mean "your input is wrong", reported as one line before Ray starts. Anything
# else is a bug (or a failure inside the run) and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError)


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


def _user_errors() -> tuple[type[BaseException], ...]:
    from checkpoint_convert.adapters import ConversionError
    from megatron_fipo.run_state import CheckpointError, RunDirError

    return (*USER_ERRORS, RunDirError, CheckpointError, ConversionError)


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
    except (ConfigError, ValueError, OSError) as error:
        print(f"fipo-train: {_one_line(error)}", file=sys.stderr)
        return 2
    return _train(config, quiet=args.quiet)


def _train(config, quiet: bool) -> int:
    from megatron_fipo.cluster.actor_group import NodeLostError
    from megatron_fipo.components import build_components, prepare_inputs
    from megatron_fipo.run_state import (
        RunLock,
        latest_checkpoint,
        select_checkpoint,
        write_run_config,
    )
    from megatron_fipo.trainer import Trainer

    output = Path(config.trainer.output_dir)
    lock = RunLock(output)
    inputs = None
    try:
        check_model_checkpoint(config)
        lock.acquire()
        # Sizes only here (cheap); the training ranks hash the contents when they load.
        select_checkpoint(output, config.trainer.resume, report=_say)
        inputs = prepare_inputs(config)
    except _user_errors() as error:
        if inputs is not None:
            inputs.reward.close()
        lock.release()
        print(f"fipo-train: {_one_line(error)}", file=sys.stderr)
        return 2
    try:
        kept = write_run_config(output, to_yaml(config))
        if kept is not None:
            _say(f"the previous config.yaml differs from this run's: kept as {kept.name}")
        parts = build_components(config, inputs, quiet=quiet)
        try:
            trainer = Trainer(config, parts)
            trainer.fit()
        finally:
            parts.close()
    except NodeLostError as error:
        # The run cannot go on without the node; what a restart needs fits on one line.
        latest = latest_checkpoint(output)
        resume = f"resume from {latest.name}" if latest else "no complete checkpoint yet"
        _say(f"{error}; {resume} with --resume auto once the cluster is back")
        return 1
    finally:
        lock.release()
    if trainer.stop.requested:
        _say(
            f"stopped by {trainer.stop.signal_name} after step {trainer.step}; checkpoint "
            f"step_{trainer.step:06d} saved in {output / 'checkpoints'}; continue with "
            "--resume auto"
        )
    return 0


def _say(message: str) -> None:
    print(f"fipo-train: {message}", file=sys.stderr, flush=True)


def _one_line(error: BaseException) -> str:
    """The message of a user error (an OSError as "reason: path"), without a traceback."""
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    return (str(error) or type(error).__name__).strip()


if __name__ == "__main__":
    sys.exit(train_main())
