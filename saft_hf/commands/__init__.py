"""The command-line layer's map of task families (cli layer: the only place that names them all).

Each family exposes one module, `saft_hf.<family>.family`, with:

- `add_analyze_arguments(parser)` and `build_probe(args, tasks, checkpoints) -> TaskProbe`
  (`saft-hf analyze --family NAME`);
- optionally `add_evaluate_arguments(parser)` and `run_evaluate(args) -> int`
  (`saft-hf evaluate NAME ...`);
- `task_pool(...)` / `model_pool(...)`: its `saft_hf.pools` implementations.

Core modules (evaluation, analysis, merging, ...) never import a family; they receive pools and
probes from here.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "demo": "saft_hf.demo.family",
    "vision": "saft_hf.vision.family",
    "glue": "saft_hf.glue.family",
}


def family_module(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; choose one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
