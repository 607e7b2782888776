"""Weight-space moves for the diagnostics: theta = theta0 + sum_i c_i * tau_i, set in place, fast.

`WeightSpace` caches, once, the live encoder tensors the task vectors cover, a copy of the
pretrained weights for those keys, and each task vector as a list aligned with them. Moving to a
point is then one fused copy plus one fused `axpy` per non-zero coefficient (`torch._foreach_*`),
with no allocation; a fixed "offset" (e.g. every other task at 0.3 in the all-task setting) is
folded into the base once, so a 2-D grid point costs copy + two axpys + the forward passes.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from saft_hf.analysis.probe import TaskProbe

__all__ = ["WeightSpace", "coefficient_grid"]

StateDict = Mapping[str, torch.Tensor]


def coefficient_grid(low: float = -0.5, high: float = 1.5, size: int = 21) -> list[float]:
    """`size` evenly spaced coefficients from `low` to `high` (both included), rounded to 1e-9."""
    if size < 2:
        raise ValueError(f"grid size must be at least 2, got {size}")
    if not high > low:
        raise ValueError(f"grid range must have high > low, got [{low}, {high}]")
    return [round(v, 9) for v in torch.linspace(low, high, size, dtype=torch.float64).tolist()]


class WeightSpace:
    """Points theta0 + sum_i c_i tau_i of the probed encoder, written in place.

    Args:
        probe: the `TaskProbe` whose encoder is moved.
        pretrained: theta0 as a state dict (encoder keys, or ``encoder.``-prefixed).
        directions: name -> task vector (same keys; a key missing from a vector counts as zero there).
            Only floating-point entries move; integer buffers (e.g. position ids) stay as they are.
    """

    def __init__(self, probe: TaskProbe, pretrained: StateDict, directions: Mapping[str, StateDict]):
        self.probe = probe
        live = probe.weight_tensors()
        keys: list[str] = []
        seen = set()
        for vec in directions.values():
            for k, v in vec.items():
                ck = probe.canonical_key(k)
                if ck not in seen and torch.is_floating_point(v):
                    seen.add(ck)
                    keys.append(ck)
        pre = {probe.canonical_key(k): v for k, v in pretrained.items()}
        missing = [k for k in keys if k not in pre]
        if missing:
            raise KeyError(f"pretrained state dict lacks {missing[:5]}... that the task vectors cover; use the same base model")
        self.keys = keys
        self._live = [live[k] for k in keys]
        self._theta0 = [pre[k].to(device=live[k].device, dtype=live[k].dtype).clone() for k in keys]
        self._base = [t.clone() for t in self._theta0]  # theta0 + fixed offset
        self._dirs: dict[str, list[torch.Tensor]] = {}
        for name, vec in directions.items():
            canon = {probe.canonical_key(k): v for k, v in vec.items()}
            cols = []
            for k, t0 in zip(keys, self._theta0):
                v = canon.get(k)
                if v is None:
                    cols.append(torch.zeros_like(t0))
                else:
                    if v.shape != t0.shape:
                        raise ValueError(f"task vector {name!r} key {k!r}: shape {tuple(v.shape)} != pretrained {tuple(t0.shape)}")
                    cols.append(v.to(device=t0.device, dtype=t0.dtype))
            self._dirs[name] = cols
        self._offset: dict[str, float] = {}

    @property
    def directions(self) -> list[str]:
        return list(self._dirs)

    def set_offset(self, coefficients: Mapping[str, float]) -> None:
        """Fold fixed coefficients (e.g. other tasks at 0.3) into the base point, once."""
        torch._foreach_copy_(self._base, self._theta0)
        for name, c in coefficients.items():
            if c:
                torch._foreach_add_(self._base, self._dir(name), alpha=float(c))
        self._offset = dict(coefficients)

    @torch.no_grad()
    def move_to(self, coefficients: Mapping[str, float] | None = None) -> None:
        """Set the encoder to base + sum_i c_i tau_i in place (base = theta0 + the offset)."""
        torch._foreach_copy_(self._live, self._base)
        for name, c in (coefficients or {}).items():
            if c:
                torch._foreach_add_(self._live, self._dir(name), alpha=float(c))

    @torch.no_grad()
    def move_to_state(self, state: Sequence[torch.Tensor]) -> None:
        """Set the encoder to a point given as a list aligned with `keys` (see `point`)."""
        torch._foreach_copy_(self._live, list(state))

    def point(self, coefficients: Mapping[str, float] | None = None, include_offset: bool = True) -> list[torch.Tensor]:
        """A new list of tensors (aligned with `keys`) holding (base or theta0) + sum_i c_i tau_i."""
        out = [t.clone() for t in (self._base if include_offset else self._theta0)]
        for name, c in (coefficients or {}).items():
            if c:
                torch._foreach_add_(out, self._dir(name), alpha=float(c))
        return out

    def state_dict(self, coefficients: Mapping[str, float] | None = None, include_offset: bool = False) -> dict[str, torch.Tensor]:
        """The point as a state dict (encoder keys), e.g. for `probe.loss(task, params=...)`."""
        return dict(zip(self.keys, self.point(coefficients, include_offset=include_offset)))

    def restore(self) -> None:
        """Put theta0 back into the encoder (and clear the offset)."""
        self.set_offset({})
        self.move_to({})

    def _dir(self, name: str) -> list[torch.Tensor]:
        if name not in self._dirs:
            raise KeyError(f"unknown direction {name!r}; known: {self.directions}")
        return self._dirs[name]
