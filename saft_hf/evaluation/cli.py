"""`saft-hf evaluate`: dispatch to a task family's evaluator.

Each family module (`saft_hf.evaluation.<family>`) exposes `add_arguments(parser)` and
`run(args) -> int` and writes a JSON + Markdown report with absolute and normalized scores.
"""
from __future__ import annotations

import argparse
import importlib

FAMILIES = {
    "vision": "saft_hf.evaluation.vision",
    "glue": "saft_hf.evaluation.glue",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="family", metavar="FAMILY", required=True)
    for family, module in FAMILIES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            # One family's missing optional dependency must not break the others' commands.
            p = sub.add_parser(family, help=f"(unavailable: {exc})")
            p.set_defaults(_family_module=module, _import_error=exc)
            continue
        p = sub.add_parser(family, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(p)
        p.set_defaults(_family_module=module)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_import_error", None) is not None:
        raise SystemExit(f"saft-hf evaluate {args.family}: cannot import {args._family_module}: {args._import_error}")
    return int(importlib.import_module(args._family_module).run(args) or 0)
