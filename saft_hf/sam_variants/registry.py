"""Name -> `SAMVariant` class. The only place that maps a `sam_variant` string to code."""

from __future__ import annotations

from typing import Callable

from .base import SAMVariant

_VARIANTS: dict[str, type[SAMVariant]] = {}


def register_sam_variant(name: str, *, replace: bool = False) -> Callable[[type[SAMVariant]], type[SAMVariant]]:
    """Class decorator: make `cls` available as `sam_variant=name`.

    Works from anywhere (a module of saft_hf.sam_variants is registered on import of the package; a
    plugin or test module registers when it is imported). Re-registering a taken name needs replace=True.
    """
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"A SAM variant name must be a non-empty lower-case string, got {name!r}.")

    def decorate(cls: type[SAMVariant]) -> type[SAMVariant]:
        if not (isinstance(cls, type) and issubclass(cls, SAMVariant)):
            raise TypeError(f"register_sam_variant({name!r}) decorates SAMVariant subclasses, got {cls!r}.")
        taken = _VARIANTS.get(name)
        if taken is not None and taken is not cls and not replace:
            raise ValueError(
                f"sam_variant {name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
                "pick another name or pass replace=True."
            )
        cls.name = name
        _VARIANTS[name] = cls
        return cls

    return decorate


def unregister_sam_variant(name: str) -> None:
    """Remove a registered variant (for tests that register a temporary one)."""
    _VARIANTS.pop(name, None)


def sam_variant_names() -> list[str]:
    return sorted(_VARIANTS)


def get_sam_variant(name: str) -> type[SAMVariant]:
    """The class registered as `name`; a ValueError listing the valid names otherwise."""
    try:
        return _VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown sam_variant {name!r}: registered variants are {', '.join(sam_variant_names())} "
            "(add one with saft_hf.sam_variants.register_sam_variant, see docs/extending-sam.md)."
        ) from None


def paper_radii_text(exclude: tuple[str, ...] = ()) -> str:
    """"asam 0.5, esam 0.05, ...; rwp: no radius": each registered variant's `default_rho()` (help texts)."""
    radii = {n: _VARIANTS[n].default_rho() for n in sam_variant_names() if n not in exclude}
    text = ", ".join(f"{n} {r:g}" for n, r in radii.items() if r is not None)
    without = [n for n, r in radii.items() if r is None]
    return text + (f"; {', '.join(without)}: no radius (sam_rho > 0 only switches it on)" if without else "")


def argument_classes() -> list[type]:
    """The `arguments` dataclasses of the registered variants, without duplicates, in name order."""
    seen: list[type] = []
    for name in sam_variant_names():
        extra = _VARIANTS[name].arguments
        if extra is not None and extra not in seen:
            seen.append(extra)
    return seen
