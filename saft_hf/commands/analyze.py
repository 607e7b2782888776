"""`saft-hf analyze --family demo|vision|glue`: the diagnostics (`saft_hf.analysis`) on a family's
task data and heads. The family builds the `TaskProbe` (`saft_hf.<family>.family.build_probe`);
`--probe-factory MODULE:FUNCTION` builds one in your own code instead."""
from __future__ import annotations

import argparse

from saft_hf.analysis import cli as analysis_cli
from saft_hf.commands import FAMILIES, family_module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    analysis_cli.add_arguments(parser)
    parser.add_argument("--family", default="demo", choices=list(FAMILIES),
                        help="task family that provides evaluation data and heads (ignored with --probe-factory)")
    parser.add_argument("--data", nargs="*", default=[], metavar="TASK=PATH",
                        help="vision / glue: local dataset per task (save_to_disk dir, ...) instead of the Hub one")
    for name in FAMILIES:
        try:
            module = family_module(name)
        except ImportError:  # a family's optional dependency is missing: its options are not offered
            continue
        group = parser.add_argument_group(f"{name} family")
        module.add_analyze_arguments(group)


def run(args: argparse.Namespace) -> int:
    def build_probe(tasks, checkpoints):
        return family_module(args.family).build_probe(args, tasks, checkpoints)

    return analysis_cli.run(args, build_probe)
