#!/usr/bin/env python
"""One Markdown table from several `saft-hf evaluate glue` reports: summarize.py OUT.md NAME=glue_eval.json ..."""
import sys

from saft_hf.glue.search import summary_table
from saft_hf.io_utils import write_text_atomic


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    table = summary_table(dict(a.split("=", 1) for a in argv[1:]))
    write_text_atomic(argv[0], "Scores in % (absolute per task; avg abs / avg norm over tasks).\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
