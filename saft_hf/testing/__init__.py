"""Tiny offline stand-ins for tests and smoke runs, never for results (family layer: they build
family-shaped models and data; nothing in the runtime packages imports them).

- `saft_hf.testing.glue`: a tiny T5 + word-level tokenizer and GLUE-shaped datasets on disk.
- `saft_hf.testing.vision`: a tiny random CLIP and tiny image datasets
  (`python -m saft_hf.testing.vision OUT_DIR` writes them for a recipe smoke run).
"""
