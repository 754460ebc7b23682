"""`subclone export`: write a child folder as one GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse
from pathlib import Path

from subclone_core.cli.commands._options import print_json
from subclone_core.io.atomic import FILE, claim_output
from subclone_core.io.gguf_export import QTYPES, export_gguf, verify_gguf
from subclone_core.sources.checks import NONFINITE_FLAG, nonfinite_in_folder, refuse_nonfinite
from subclone_core.sources.folders import weight_files


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    p = sub.add_parser("export", help="write a child as one GGUF file (llama.cpp, Ollama, LM Studio)",
                       description="Export a causal-LM model folder to GGUF and check that transformers' "
                                   "GGUF loader reads it back to the same logits and token ids.")
    p.add_argument("--model", required=True, metavar="DIR", help="a model folder (e.g. made by `subclone make`)")
    p.add_argument("--to", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument("--type", default="f32", choices=list(QTYPES), dest="qtype",
                   help="matrix type: f32 (exact), f16 or q8_0 (default: f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the file back with transformers and comparing logits and token ids")
    p.add_argument(NONFINITE_FLAG, dest="allow_nonfinite", action="store_true",
                   help="export even if the weights hold NaN or infinite values (refused by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with claim_output(args.to, overwrite=args.overwrite, kind=FILE, flag="--to"):  # one writer per file
        return export(args)


def export(args: argparse.Namespace) -> int:
    """Write the claimed --to file, verify it unless told not to, and print what was written."""
    if not args.allow_nonfinite:  # refused before anything is written
        refuse_nonfinite(f"the model {args.model!r}", nonfinite_in_folder(weight_files(Path(args.model))))
    result = export_gguf(args.model, args.to, qtype=args.qtype, overwrite=args.overwrite).as_dict()
    if args.verify:
        result["verify"] = verify_gguf(args.model, args.to)
    if args.json:
        print_json(result)
        return 0
    print(f"wrote {result['path']}: {result['arch']}, {result['type']}, {result['tensors']} tensors, "
          f"{result['bytes'] / 1e6:.1f} MB in {result['seconds']:.1f} s")
    if args.verify:
        check = result["verify"]
        ids = "same token ids" if check["same_token_ids"] else "DIFFERENT token ids"
        print(f"read back by transformers: max relative logit difference {check['max_rel_logit_diff']:.2e} "
              f"over {check['tokens']} tokens; tokenizer: {ids}")
    return 0
