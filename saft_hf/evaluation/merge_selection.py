"""Which merge methods a study runs, from a command line's `--merges` words (every family's study)."""
from __future__ import annotations

from typing import Sequence

def merges_help(default: str = "the registry's study methods") -> str:
    """The `--merges` help text of a study command whose default rows are `default`."""
    return (f"merge methods to run (default: {default}): registered methods or search aliases (e.g. regmean "
            "fisher_merging adamerging, which read each task's unlabeled inputs through the family's heads), "
            "'study' for every study method of the registry, 'all' for every registered method")


MERGES_HELP = merges_help()


def merge_names(merges: Sequence[str] | None) -> list[str] | None:
    """`--merges` words -> method names: "study" = the registry's study methods, "all" = every
    registered method, others by name (checked); duplicates dropped; None/empty -> None (the default)."""
    from saft_hf.merging import registry

    if not merges:
        return None
    out: list[str] = []
    for name in merges:
        expanded = (registry.method_names(study_only=True) if name == "study"
                    else registry.method_names() if name == "all" else [name])
        out += [n for n in expanded if n not in out]
    unknown = [n for n in out if n not in registry.search_names()]
    if unknown:
        raise ValueError(f"unknown merge method(s) {unknown}; choose from {registry.search_names()}, 'study' or 'all'")
    return out
