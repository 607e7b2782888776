"""SAM variants: one strategy class per `sam_variant` value, registered by name.

Every module in this package is imported here, so a variant in its own file registers itself with
`@register_sam_variant("name")`; nothing else in saft_hf names a variant. See docs/extending-sam.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Perturbation, SAMStep, SAMVariant, TrainingSetup
from .registry import (
    argument_classes,
    get_sam_variant,
    register_sam_variant,
    sam_variant_names,
    unregister_sam_variant,
)

__all__ = [
    "Perturbation",
    "SAMStep",
    "SAMVariant",
    "TrainingSetup",
    "argument_classes",
    "get_sam_variant",
    "register_sam_variant",
    "sam_variant_names",
    "unregister_sam_variant",
]

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
