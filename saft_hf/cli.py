"""`saft-hf` command line: one sub-command per job, each implemented in its own module.

Every command module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its sub-command runs, so `saft-hf --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). The module owns its arguments and its --help text.
COMMANDS = {
    "merge": ("saft_hf.merging.cli", "merge fine-tuned checkpoints (task arithmetic, TIES, DARE, ...) from a YAML config"),
    "evaluate": ("saft_hf.commands.evaluate", "evaluate a checkpoint or merged model on its tasks (absolute + normalized accuracy)"),
    "analyze": ("saft_hf.commands.analyze", "the paper's diagnostics: disentanglement, cross-task linearity, landscape, Hessian, barrier"),
    "compare": ("saft_hf.commands.compare", "paired comparison of two fine-tuning methods on merge-study reports (bootstrap CI, McNemar, forest plot)"),
    "demo": ("saft_hf.demo.cli", "offline end-to-end SAFT study: MiniLM x real text tasks, AdamW vs ASAM, merged and evaluated"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saft-hf",
        description="Sharpness-aware fine-tuning for model merging: merge, evaluate, analyze, demo.",
    )
    from saft_hf import __version__

    parser.add_argument("--version", action="version", version=f"saft-hf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Only the sub-command being run (or asked for help) needs its module imported.
        if name in argv:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
