"""`saft-hf` command line: one sub-command per job, each implemented in its own module.

Every command module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its sub-command runs, so `saft-hf --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). The module owns its arguments and its --help text.
COMMANDS = {
    "merge": ("saft_hf.commands.merge", "merge fine-tuned checkpoints (task arithmetic, TIES, DARE, ...) from a YAML config"),
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
    # `saft-hf evaluate vision: error: ...`: the family is part of the command the user typed
    label = " ".join(filter(None, [args.command, getattr(args, "family", None) if args.command == "evaluate" else None]))
    return run_command(label, importlib.import_module(args._module).run, args)


def error_line(command: str, message: object) -> str:
    """`saft-hf COMMAND: error: MESSAGE` on exactly one line (torch / HF messages span several)."""
    return f"saft-hf {command}: error: " + " ".join(str(message).split())


def run_command(command: str, run, args: argparse.Namespace) -> int:
    """Run one sub-command; every failure becomes one `saft-hf COMMAND: error:` line and exit 1.

    The commands raise plain exceptions with messages naming the input and the fix; this is the one
    place that turns them into the command line's output: OSError (disk full, read-only output,
    missing path, ...) via `io_utils.os_error_message`, ValueError / KeyError / LookupError as
    their message, anything else as a bug, with the traceback on request (SAFT_HF_DEBUG=1).
    """
    from saft_hf.io_utils import os_error_message

    output = next((getattr(args, name) for name in ("output", "output_dir") if getattr(args, name, None)), None)
    try:
        return int(run(args) or 0)
    except OSError as exc:
        message = os_error_message(exc, output=output)
    except KeyError as exc:  # str(KeyError) adds quotes around the message
        message = exc.args[0] if exc.args else repr(exc)
    except (ValueError, LookupError) as exc:
        message = str(exc)
    except MemoryError:
        message = "out of memory; use fewer or smaller models, a smaller batch, or a machine with more RAM"
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("SAFT_HF_DEBUG"):
            raise
        message = (f"unexpected {type(exc).__name__}: {exc} (a bug in saft-hf, or an input it does not check "
                   "yet; run again with SAFT_HF_DEBUG=1 for the traceback and report it)")
    print(error_line(command, message), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
