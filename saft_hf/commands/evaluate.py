"""`saft-hf evaluate FAMILY ...`: dispatch to a task family's evaluation command.

Each family module (`saft_hf.<family>.family`, see `saft_hf.commands.FAMILIES`) that offers one exposes
`add_evaluate_arguments(parser)` and `run_evaluate(args) -> int`; it writes a JSON + Markdown report
with absolute and normalized scores (`--merge-study`: the shared merge-study driver's report).
"""
from __future__ import annotations

import argparse
import importlib

from saft_hf.commands import FAMILIES


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
        if not hasattr(mod, "add_evaluate_arguments"):
            continue
        doc = (getattr(mod, "EVALUATE_HELP", None) or "").strip()
        p = sub.add_parser(family, help=doc.splitlines()[0] if doc else None, description=doc or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_evaluate_arguments(p)
        p.set_defaults(_family_module=module)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_import_error", None) is not None:
        raise SystemExit(f"saft-hf evaluate {args.family}: cannot import {args._family_module}: {args._import_error}")
    return int(importlib.import_module(args._family_module).run_evaluate(args) or 0)
