"""`saft-hf merge`: the merging command (saft_hf.merging.cli) with the task families' task pools
for `--search` (`evaluator: {family: demo|vision|glue, ...}`): each family's
`saft_hf.<family>.family.merge_task_pool(pretrained, tasks, **args)` builds it."""
from __future__ import annotations

from saft_hf.commands import FAMILIES, family_module
from saft_hf.merging import cli as merging_cli

add_arguments = merging_cli.add_arguments


def resolve_family(name, pretrained: str, tasks, args: dict):
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"`evaluator: family: {name}` is not a task family; choose one of {sorted(FAMILIES)} "
                         "(or give `evaluator: package.module:function`)")
    try:
        module = family_module(name)
    except ImportError as exc:
        raise ValueError(f"task family {name} is unavailable ({exc}); install its extra") from None
    try:
        return module.merge_task_pool(pretrained, list(tasks), **args)
    except TypeError as exc:  # an unknown family argument
        raise ValueError(f"`evaluator: family: {name}`: {exc}; see saft_hf.{name}.family.merge_task_pool") from None


def run(args) -> int:
    return merging_cli.run(args, resolve_family=resolve_family)
