"""The sharpness-aware perturbation (SAM / ASAM) as pure functions over lists of tensors.

No Trainer knowledge lives here, so analysis code and other trainers can reuse it.

For parameters w with gradient g, a radius rho and a scale operator T:
    n = || T * g ||                 (one global norm over every perturbed tensor)
    e = rho * T * T * g / (n + 1e-12)
SAM is T = 1; ASAM (Kwon et al., 2021) is T = |w| + eta. `scaled[i]` says whether tensor i gets
T = |w| + eta (True) or T = 1 (False); see `adaptive_scale_mask` for the two conventions.

`perturbation_` writes e into the gradient tensors in place (they are the caller's scratch), so the
only extra memory for a SAM step is the backup made by `perturb_`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

EPSILON = 1e-12
# Largest number of elements turned into a temporary |w| at once (bounds the scratch memory of ASAM).
_SCRATCH_NUMEL = 1 << 22


@dataclass
class PerturbationResult:
    """What `perturbation_` did. `applied` is False when the gradient norm was not finite."""

    applied: bool
    grad_norm: torch.Tensor  # n = ||T g|| (before the finiteness check; may be inf/nan)
    perturbation_norm: torch.Tensor | None  # ||e||, None when not applied


def adaptive_scale_mask(names: Sequence[str], scope: str) -> list[bool]:
    """Which tensors get T = |w| + eta.

    - "all": every tensor (SAFT paper code, davda54/sam).
    - "weights": tensors whose name contains "weight" (the official SamsungLabs ASAM test,
      `"weight" in name`), so weight-normed tensors count too: `weight_g`/`weight_v` and
      `parametrizations.weight.original0/1`; T = 1 for biases and the rest.
    """
    if scope == "all":
        return [True] * len(names)
    if scope == "weights":
        return ["weight" in name for name in names]
    raise ValueError(f"Unknown ASAM scope {scope!r}: use 'all' or 'weights'.")


def _chunks(indices: Sequence[int], tensors: Sequence[torch.Tensor], max_numel: int) -> Iterable[list[int]]:
    """Group tensor indices so each group holds at most `max_numel` elements (or one big tensor)."""
    group, size = [], 0
    for i in indices:
        numel = tensors[i].numel()
        if group and size + numel > max_numel:
            yield group
            group, size = [], 0
        group.append(i)
        size += numel
    if group:
        yield group


def _multiply_by_scale_(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scaled: Sequence[bool], eta: float
) -> None:
    """grads[i] *= |params[i]| + eta for every scaled tensor, with bounded scratch memory."""
    indices = [i for i, s in enumerate(scaled) if s]
    for group in _chunks(indices, params, _SCRATCH_NUMEL):
        weights = [params[i].detach() for i in group]
        scale = torch._foreach_abs(weights)
        if eta:
            torch._foreach_add_(scale, eta)
        torch._foreach_mul_([grads[i] for i in group], scale)
        del scale


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of `tensors`, computed in float32 or wider."""
    if not tensors:
        return torch.zeros(())
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    # accumulate half-precision tensors in float32 (bf16 per-tensor norms would keep ~3 digits)
    norms = torch._foreach_norm(list(tensors), 2.0, dtype=dtype)
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def _rescale_for_norm_(grads: list[torch.Tensor]) -> float:
    """Divide g in place by its largest magnitude; returns that divisor (1.0 if nothing to do).

    Used when the squares in ||g|| overflow although every entry is finite (e.g. a large fp16
    loss scale): e does not depend on the scale of g. Returns inf/nan if an entry is not finite.
    """
    largest = max(float(m) for m in torch._foreach_norm(grads, float("inf")))
    if not math.isfinite(largest):
        return largest
    if largest == 0.0:
        return 1.0
    torch._foreach_mul_(grads, 1.0 / largest)
    return largest


@torch.no_grad()
def perturbation_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    rho: float,
    adaptive: bool = True,
    eta: float = 0.0,
    scaled: Sequence[bool] | None = None,
    all_finite: Callable[[bool], bool] | None = None,
) -> PerturbationResult:
    """Turn `grads` into the SAM/ASAM perturbation e, in place.

    `params` and `grads` are aligned lists (no None). `scaled` (default: all True) selects the
    tensors with T = |w| + eta when `adaptive`; it is ignored for plain SAM. `all_finite` lets a
    distributed caller agree on finiteness across ranks (e.g. an all-reduce of the local flag);
    when the agreed answer is False, nothing is perturbed and the caller should take a plain step
    (the contents of `grads` are then unspecified).
    """
    if len(params) != len(grads):
        raise ValueError(f"params and grads must align, got {len(params)} params and {len(grads)} grads.")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}.")
    grads = list(grads)
    if adaptive:
        scaled = [True] * len(params) if scaled is None else list(scaled)
        if len(scaled) != len(params):
            raise ValueError(f"scaled must have one flag per tensor ({len(params)}), got {len(scaled)}.")
        _multiply_by_scale_(params, grads, scaled, eta)  # g <- T g
    grad_norm = global_norm(grads) if grads else torch.zeros(())
    divisor = 1.0  # grads now hold (T g) / divisor
    if grads and not bool(torch.isfinite(grad_norm)):
        divisor = _rescale_for_norm_(grads)
        if math.isfinite(divisor):
            grad_norm = global_norm(grads).double() * divisor
    finite = bool(torch.isfinite(grad_norm))
    if all_finite is not None:
        finite = all_finite(finite)
    if not finite or not grads:
        return PerturbationResult(applied=False, grad_norm=grad_norm, perturbation_norm=None)
    if adaptive:
        _multiply_by_scale_(params, grads, scaled, eta)  # T g -> T T g
    factor = rho / (grad_norm.item() + EPSILON) * divisor
    torch._foreach_mul_(grads, factor)
    return PerturbationResult(applied=True, grad_norm=grad_norm, perturbation_norm=global_norm(grads))


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor], perturbation: list[torch.Tensor | None], *, release: bool = False
) -> list[torch.Tensor]:
    """w <- w + e in place (works for views into flat buffers); returns the backups of w.

    Works in chunks of at most `_SCRATCH_NUMEL` elements. With `release=True` the entries of the
    `perturbation` list are set to None as they are consumed, so e and the backups never both
    exist in full: the peak is one copy of the parameters plus one chunk.
    """
    backups: list[torch.Tensor] = []
    for group in _chunks(range(len(params)), params, _SCRATCH_NUMEL):
        weights = [params[i].detach() for i in group]
        backups.extend(torch._foreach_mul(weights, 1.0))  # a fused clone
        torch._foreach_add_(weights, [perturbation[i].to(w.dtype) for i, w in zip(group, weights)])
        if release:
            for i in group:
                perturbation[i] = None
    return backups


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor]) -> None:
    """Copy the backups back in place (never by subtracting e, which drifts in low precision)."""
    if params:
        torch._foreach_copy_([p.detach() for p in params], list(backups))


def reference_perturbation(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    rho: float,
    adaptive: bool = True,
    eta: float = 0.0,
    scaled: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """Out-of-place, one-line-per-formula version of `perturbation_` (for tests and analysis)."""
    if scaled is None:
        scaled = [True] * len(params)
    scales = [
        (p.detach().abs() + eta) if (adaptive and s) else torch.ones_like(p) for p, s in zip(params, scaled)
    ]
    tg = torch.cat([(t * g).flatten() for t, g in zip(scales, grads)])
    n = tg.norm()
    return [rho * t * t * g / (n + EPSILON) for t, g in zip(scales, grads)]


# ---------------------------------------------------------------------- helpers of the SAM variants
# Every cross-tensor reduction of the variants (norms, inner products, projections) goes through
# `global_norm` / `global_dot` below, so a sharded engine (FSDP2) can reduce them over the shards in
# one place. Element-wise maths needs no reduction and works per shard.


def global_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """<a, b> over the concatenation of the tensors, in float32 or wider."""
    if len(a) != len(b):
        raise ValueError(f"global_dot needs aligned lists, got {len(a)} and {len(b)} tensors.")
    if not a:
        return torch.zeros(())
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    total = torch.zeros((), dtype=dtype, device=a[0].device)
    for x, y in zip(a, b):
        total += torch.sum(x.to(dtype) * y.to(dtype))
    return total


@torch.no_grad()
def orthogonal_component(v: Sequence[torch.Tensor], u: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """v minus its projection on u: v - (<v, u> / ||u||^2) u (new tensors; u = 0 leaves v unchanged)."""
    coefficient = global_dot(v, u) / (global_norm(u) ** 2 + EPSILON)
    return [x - coefficient.to(x.dtype) * y for x, y in zip(v, u)]


@torch.no_grad()
def looksam_reuse_(
    grads: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], alpha: float, direction_norm: float | None = None
) -> None:
    """LookSAM between refreshes: g <- g + alpha * (||g|| / ||g_v||) * g_v, in place (Liu et al., 2022).

    `direction_norm` is ||g_v|| if the caller kept it (it does not change between refreshes)."""
    if direction_norm is None:
        direction_norm = float(global_norm(direction))
    factor = alpha * float(global_norm(grads)) / (direction_norm + EPSILON)
    torch._foreach_add_(list(grads), list(direction), alpha=factor)


@torch.no_grad()
def gsam_combine_(
    perturbed_grads: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], alpha: float
) -> None:
    """GSAM: g_s <- g_s - alpha * (g orthogonal to g_s), in place (Zhuang et al., 2022).

    g_s is the gradient at w + e, g the one at w; the component of g orthogonal to g_s is
    g - c g_s with c = <g, g_s> / ||g_s||^2, so the update is (1 + alpha c) g_s - alpha g (no temporary).
    """
    perturbed_grads, grads = list(perturbed_grads), list(grads)
    if not perturbed_grads:
        return
    c = float(global_dot(grads, perturbed_grads)) / (float(global_norm(perturbed_grads)) ** 2 + EPSILON)
    torch._foreach_mul_(perturbed_grads, 1.0 + alpha * c)
    torch._foreach_add_(perturbed_grads, [g.to(s.dtype) for g, s in zip(grads, perturbed_grads)], alpha=-alpha)


@torch.no_grad()
def fisher_perturbation_(
    grads: Sequence[torch.Tensor],
    *,
    rho: float,
    eta: float,
    fisher: Sequence[torch.Tensor] | None = None,
    all_finite: Callable[[bool], bool] | None = None,
) -> PerturbationResult:
    """Fisher-SAM (Kim et al., 2022), in place: e = rho * g / f / sqrt(sum g^2 / f), f = 1 + eta * F.

    F is the diagonal Fisher estimate: `fisher` (e.g. a running mean of g^2) or, when None, the
    squared mini-batch gradient g^2 as in the paper. e maximises <g, e> over the ellipsoid
    e^T diag(f) e <= rho^2.
    """
    grads = list(grads)
    if not grads:
        return PerturbationResult(applied=False, grad_norm=torch.zeros(()), perturbation_norm=None)
    grad_norm = global_norm(grads)
    finite = bool(torch.isfinite(grad_norm))
    if all_finite is not None:
        finite = all_finite(finite)
    if not finite:
        return PerturbationResult(applied=False, grad_norm=grad_norm, perturbation_norm=None)
    source = grads if fisher is None else list(fisher)
    inverse = []
    for g, s in zip(grads, source):  # 1 / (1 + eta * F), element-wise
        f = s * s if fisher is None else s.to(g.dtype)
        inverse.append(torch.reciprocal(f.mul(eta).add_(1.0)))
    scaled = [g * i for g, i in zip(grads, inverse)]  # F^-1 g
    denominator = torch.sqrt(global_dot(grads, scaled))  # sqrt(g^T F^-1 g)
    factor = rho / (float(denominator) + EPSILON)
    torch._foreach_copy_(grads, scaled)
    torch._foreach_mul_(grads, factor)
    return PerturbationResult(applied=True, grad_norm=grad_norm, perturbation_norm=global_norm(grads))


def filterwise_gaussian(
    weights: Sequence[torch.Tensor], sigma: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """Random weight perturbation: for each row i of a matrix W (out x in...), e_i ~ N(0, sigma^2 ||W_i||^2 / n)
    with n the row's size (Flat-LoRA, Li et al., 2024); 1-D tensors (biases, norms) get e = 0.

    The noise of tensor k is drawn, in list order, with `torch.randn(W.shape, generator=generator)` on CPU
    in float32 (so every device and rank that seeds the generator alike draws the same e).
    """
    noise = []
    for w in weights:
        if w.dim() < 2:
            noise.append(torch.zeros_like(w))
            continue
        z = torch.randn(tuple(w.shape), generator=generator, dtype=torch.float32).to(w.device)
        rows = w.detach().reshape(w.shape[0], -1)
        std = sigma * torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32) / math.sqrt(rows.shape[1])
        noise.append(z.mul_(std.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    return noise


def sharpest_examples(before: torch.Tensor, after: torch.Tensor, gamma: float) -> torch.Tensor:
    """ESAM's sharpness-sensitive data selection: indices of the int(gamma * B) examples (at least one)
    with the largest loss increase after - before, in increasing index order."""
    if before.shape != after.shape or before.dim() != 1:
        raise ValueError(f"per-example losses must be two 1-D tensors of one shape, got {before.shape}, {after.shape}.")
    count = max(1, int(before.numel() * gamma))
    chosen = torch.topk(after - before, count).indices
    return torch.sort(chosen).values


def noise_seed(seed: int, global_step: int, micro_batch: int, rank: int = 0) -> int:
    """The seed of the random perturbation of one micro-batch (one generator per micro-batch, so a resumed
    run draws the same noise and ranks sharing a perturbation draw the same one). A fixed, documented mix."""
    return ((int(seed) * 1_000_003 + int(global_step)) * 10_007 + int(micro_batch)) * 101 + int(rank)
