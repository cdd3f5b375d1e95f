"""The ``diffusers-sdnq`` command line: inspect, verify, dequantize and quantize SDNQ checkpoints.

Exit status: 0 success, 1 a problem was found or the command could not be done (the message says why),
2 wrong usage (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .checkpoint import CLIError

DTYPE_CHOICES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="describe an SDNQ checkpoint (headers and configs only, no weight is read)",
        description="Describe each component of a pipeline folder, a model folder or a single .safetensors file: "
                    "quant method, sdnq version, dtype histogram, bits per weight, SVD ranks, group sizes, bytes on "
                    "disk vs dense bf16, and the layers left unquantized. Reads configs and safetensors headers only.",
    )
    p.add_argument("path", help="pipeline folder (model_index.json), model folder (config.json) or .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema in docs/cli.md)")
    p.add_argument("--layers", action="store_true", help="also list every quantized layer")
    p.add_argument("--no-model", action="store_true",
                   help="do not build the model class on the meta device; infer dense shapes from the stored tensors")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="read every tensor, check it against the config, dequantize and look for NaN/Inf",
        description="Check a checkpoint end to end: headers and byte counts, every quantized layer's stored tensors "
                    "against the layout its config implies, then read every tensor and dequantize every layer (one "
                    "layer at a time) and check for NaN/Inf. Exits 1 with a report naming file, tensor and what was "
                    "expected on any problem.",
    )
    p.add_argument("path", help="pipeline folder, model folder or .safetensors file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-model", action="store_true", help="infer dense shapes from the stored tensors")


def _add_dequantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dequantize", help="write a plain diffusers/transformers folder that loads without diffusers-sdnq",
        description="Dequantize every SDNQ layer and write a plain folder: config.json without quantization_config, "
                    "every other file copied, safetensors shards (+ index when sharded). Streams one layer at a time; "
                    "OUT appears only when complete (written to a temporary folder beside it, then renamed).",
    )
    p.add_argument("path", help="pipeline folder, model folder, or .safetensors file with its config.json beside it")
    p.add_argument("out", help="output folder (or .safetensors file for a file input); must not exist")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES,
                   help="dtype of the dequantized weights and of the other float tensors of quantized components "
                        "(default: bf16); unquantized components are copied unchanged")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (swapped in atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-model", action="store_true", help="infer dense shapes from the stored tensors")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a dense pipeline or model folder with diffusers-sdnq's writer",
        description="Load each selected component with from_pretrained(..., quantization_config=SDNQ config) "
                    "(quantize on load) and save it; other components and files are copied. Options the writer "
                    "cannot produce yet fail before any weight is read.",
    )
    p.add_argument("src", help="dense pipeline folder or model folder")
    p.add_argument("out", help="output folder; must not exist")
    p.add_argument("--weights-dtype", required=True, help="SDNQ weights dtype, e.g. uint4, int8, int5")
    p.add_argument("--svd-rank", type=int, default=None, help="add an SVD low-rank correction of this rank")
    p.add_argument("--dynamic", action="store_true", help="dynamic quantization (per-layer dtype choice)")
    p.add_argument("--group-size", type=int, default=None, help="elements per group (0 auto, -1 row-wise)")
    p.add_argument("--min-numel", type=int, default=None,
                   help="leave layers with fewer weights than this dense (the format's minimum_allowed_numel)")
    p.add_argument("--components", default=None,
                   help="comma-separated pipeline components to quantize (default: transformer or unet)")
    p.add_argument("--torch-dtype", default="auto", choices=("auto", *DTYPE_CHOICES),
                   help="dtype to load the model in (default: the checkpoint's float dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (swapped in atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="diffusers-sdnq",
        description="Inspect, verify, dequantize and quantize SDNQ checkpoints (diffusers / transformers folders).",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-sdnq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_inspect(sub)
    _add_verify(sub)
    _add_dequantize(sub)
    _add_quantize(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffusers-sdnq`` console script and ``python -m diffusers_sdnq``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import importlib

    try:
        command = importlib.import_module(f"{__name__}.{args.command}_cmd")
        return command.run(args)
    except BrokenPipeError:  # output piped into `head` & co: not an error of ours
        sys.stderr.close()
        return 0
    except (CLIError, ValueError, NotImplementedError, OSError) as exc:
        print(f"diffusers-sdnq {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffusers-sdnq {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["CLIError", "build_parser", "main"]
