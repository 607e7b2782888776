#!/usr/bin/env python
"""Save the base model as transformers loads it (weights + tokenizer) to a local directory.

    python recipes/flan_t5_glue/export_pretrained.py --model google/flan-t5-base --output runs/flan_t5_glue/pretrained

Fine-tune from that directory and merge against it, so task vectors are taken against exactly
the weights fine-tuning started from, with the same tensor names and ties.
"""
import argparse
import sys

from saft_hf.glue.search import export_pretrained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="google/flan-t5-base", help="Hub name or local directory")
    p.add_argument("--output", required=True, help="new directory (must not exist)")
    args = p.parse_args(argv)
    print(export_pretrained(args.model, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
