"""lm2-convert: Megatron dist checkpoints <-> Hugging Face folders.

    lm2-convert to-hf   --load CKPT --save HF_DIR [--tokenizer PATH] [--dtype bfloat16]
    lm2-convert from-hf --load HF_DIR --save CKPT --tensor-model-parallel-size 2 \\
                        --pipeline-model-parallel-size 2

Runs as one CPU process (no torchrun): any saved TP/PP is resharded on load. Bad input ends with
one line naming the flag, file or value and exit code 2 (megatron_lm2.cli_errors); --debug or
LM2_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional, Sequence

from megatron_lm2.cli_args import ArgumentParser, quiet_library_warnings
from megatron_lm2.cli_errors import UserInputError, cli_entry


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lm2-convert",
        description="Convert LM2 checkpoints between Megatron (dist checkpoint) and Hugging Face.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    to_hf = sub.add_parser(
        "to-hf",
        help="Megatron dist checkpoint (any TP/PP) -> Hugging Face folder",
        description="Export a Megatron dist checkpoint (saved at any TP/PP) as a Hugging Face "
        "folder: config.json, safetensors weights, generation_config.json, the LM2 modeling "
        "code (trust_remote_code=True) or a plain Llama for models without memory.",
    )
    to_hf.add_argument("--load", required=True, help="Megatron dist checkpoint directory (lm2-convert from-hf output, or a lm2-train --save directory: its newest checkpoint)")
    to_hf.add_argument("--save", required=True, help="output Hugging Face folder")
    to_hf.add_argument(
        "--tokenizer",
        help="tokenizer to ship: a tokenizer.json, a SentencePiece .model, a directory holding "
        "one, or 'default' (the embedded tokenizer); checked against the model vocabulary",
    )
    to_hf.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"),
        help="weight dtype in the export (default: as stored in the checkpoint)",
    )
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --save folder")
    to_hf.add_argument("--allow-unverified-checkpoint", action="store_true",
                       help="export a checkpoint that has no lm2_integrity.json (written before the record "
                       "existed), unverified; without it such a checkpoint is refused")

    from_hf = sub.add_parser(
        "from-hf",
        help="Hugging Face folder -> Megatron dist checkpoint for continued pretraining",
        description="Import an LM2 or Llama Hugging Face folder (safetensors only; its Python "
        "files are never run) as a Megatron dist checkpoint for the given TP/PP.",
    )
    from_hf.add_argument("--load", required=True, help="Hugging Face folder")
    from_hf.add_argument("--save", required=True, help="output Megatron checkpoint directory")
    from_hf.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="T")
    from_hf.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P")
    from_hf.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128,
        help="pad the vocabulary to a multiple of this times T (Megatron's rule; default 128)",
    )
    from_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    return parser


class ConversionInputError(UserInputError):
    """A value in the input folder the conversion cannot use (e.g. a config field that does not
    fit the model); the message names the folder."""


def _quiet() -> None:
    # Megatron-core warns at import about Apex/TE fallbacks that do not concern conversion.
    quiet_library_warnings()
    warnings.filterwarnings("ignore", module=r"megatron\.core")


@cli_entry("lm2-convert")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserInputError("needs transformers (pip install -e .[hf])") from None
    try:
        if args.command == "to-hf":
            from megatron_lm2.convert.to_hf import to_hf

            out = to_hf(
                args.load, args.save, tokenizer=args.tokenizer, dtype=args.dtype,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                allow_unverified=args.allow_unverified_checkpoint,
            )
        else:
            from megatron_lm2.convert.from_hf import from_hf

            out = from_hf(
                args.load, args.save,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                overwrite=args.overwrite,
            )
    except UserInputError:
        raise
    except (ValueError, KeyError, AssertionError, RuntimeError) as exc:
        # A field of the input the model code rejects (TransformerConfig's asserts, a shape
        # mismatch in a copy): a property of the input, so one line naming it.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConversionInputError(f"{args.load}: {type(exc).__name__}: {message}") from exc
    print(f"lm2-convert: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
