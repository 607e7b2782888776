"""Offline end-to-end SAFT study: MiniLM on real text tasks, AdamW vs ASAM, merged and evaluated.

`saft-hf demo` (see `saft_hf.demo.cli`) runs `saft_hf.demo.study.run_study`.
"""
