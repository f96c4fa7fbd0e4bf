"""``fipo-convert`` / ``python -m checkpoint_convert``: hf-to-megatron, megatron-to-hf, verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    units = {"GB": 1024**3, "MB": 1024**2, "KB": 1024}
    for suffix, factor in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fipo-convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser(
        "hf-to-megatron", help="HF safetensors -> Megatron torch_dist"
    )
    to_megatron.add_argument("--hf-dir", type=Path, required=True)
    to_megatron.add_argument("--output-dir", type=Path, required=True)
    to_megatron.add_argument("--force", action="store_true", help="replace a non-empty output dir")
    to_megatron.add_argument("--no-progress", action="store_true")

    to_hf = commands.add_parser("megatron-to-hf", help="Megatron torch_dist -> HF safetensors")
    to_hf.add_argument("--megatron-dir", type=Path, required=True)
    to_hf.add_argument("--output-dir", type=Path, required=True)
    to_hf.add_argument(
        "--hf-config-dir",
        type=Path,
        help="config.json + tokenizer source (default: <megatron-dir>/hf_config)",
    )
    to_hf.add_argument("--dtype", choices=sorted(_DTYPES), help="cast weights (default: as stored)")
    to_hf.add_argument("--max-shard-size", type=_size, default="5GB")
    to_hf.add_argument("--force", action="store_true", help="replace a non-empty output dir")
    to_hf.add_argument("--no-progress", action="store_true")

    verify = commands.add_parser("verify", help="compare logits: transformers vs Megatron")
    verify.add_argument("--hf-dir", type=Path, required=True)
    verify.add_argument("--megatron-dir", type=Path, required=True)
    verify.add_argument("--tp", type=int, default=1)
    verify.add_argument("--pp", type=int, default=1)
    verify.add_argument("--batch-size", type=int, default=2)
    verify.add_argument("--seq-len", type=int, default=16)
    verify.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit diff allowed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from checkpoint_convert.adapters import ConversionError

    try:
        if args.command == "hf-to-megatron":
            from checkpoint_convert.convert import hf_to_megatron

            hf_to_megatron(
                args.hf_dir, args.output_dir, force=args.force, progress=not args.no_progress
            )
            print(f"wrote Megatron checkpoint {args.output_dir}")
        elif args.command == "megatron-to-hf":
            import torch

            from checkpoint_convert.convert import megatron_to_hf

            megatron_to_hf(
                args.megatron_dir,
                args.output_dir,
                hf_config_dir=args.hf_config_dir,
                force=args.force,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                max_shard_bytes=args.max_shard_size,
                progress=not args.no_progress,
            )
            print(f"wrote HF checkpoint {args.output_dir}")
        else:
            from checkpoint_convert.verify import VerifyConfig, verify

            result = verify(
                VerifyConfig(
                    hf_dir=args.hf_dir,
                    megatron_dir=args.megatron_dir,
                    tensor_parallel=args.tp,
                    pipeline_parallel=args.pp,
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                )
            )
            print(f"max_abs_logit_diff={result.max_abs_diff:.3e} mean_kl={result.mean_kl:.3e}")
            if result.max_abs_diff > args.tolerance:
                print(
                    f"FAILED: max abs logit diff above tolerance {args.tolerance}", file=sys.stderr
                )
                return 1
            print("OK")
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
