"""The sharpness-aware perturbation (SAM / ASAM) as pure functions over lists of tensors.

No Trainer knowledge lives here, so analysis code and other trainers can reuse it.

For parameters w with gradient g, a radius rho and a scale operator T:
    n = || T * g ||                 (one global norm over every perturbed tensor)
    e = rho * T * T * g / (n + 1e-12)
SAM is T = 1; ASAM (Kwon et al., 2021) is T = |w| + eta. `scaled[i]` says whether tensor i gets
T = |w| + eta (True) or T = 1 (False); see `adaptive_scale_mask` for the two conventions.

`perturbation_` writes e into the gradient tensors in place (they are the caller's scratch), so the
only extra memory for a SAM step is the backup made by `perturb_`.

Sharded tensors (FSDP2). Every function here also takes `torch.distributed.tensor.DTensor`s (FSDP2's
sharded parameters and gradient shards): element-wise work runs on each rank's local shard, and every
cross-tensor reduction (`global_norm`, `global_dot`, `global_max_abs`) reduces its per-rank partial
result over the mesh dimensions the tensors are sharded on, in one place (`_reduce_over_shards`), so
the result equals the one on the unsharded tensors. Plain tensors are reduced locally, unchanged.
"""

from __future__ import annotations

import functools
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
    """grads[i] *= |params[i]| + eta for every scaled tensor, with bounded scratch memory (per local shard)."""
    params, grads = local_tensors(params), local_tensors(grads)
    indices = [i for i, s in enumerate(scaled) if s]
    for group in _chunks(indices, params, _SCRATCH_NUMEL):
        weights = [params[i].detach() for i in group]
        scale = torch._foreach_abs(weights)
        if eta:
            torch._foreach_add_(scale, eta)
        torch._foreach_mul_([grads[i] for i in group], scale)
        del scale


# ---------------------------------------------------------------------- sharded tensors (FSDP2)
@functools.lru_cache(maxsize=None)  # called for every tensor of every step: import once
def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a `DTensor` (an FSDP2 parameter or gradient shard)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's local shard of every DTensor (a view: in-place edits reach the DTensor); plain tensors as is."""
    return [t.to_local() if is_sharded(t) else t for t in tensors]


def _shard_key(tensor: torch.Tensor):
    """(mesh, the mesh dims `tensor` is sharded on), or None for a plain / fully replicated tensor."""
    if not is_sharded(tensor):
        return None
    dims = []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise ValueError(
                "A cross-tensor reduction got a DTensor with a Partial placement (a pending sum over ranks); "
                "redistribute it to Shard/Replicate first."
            )
        if placement.is_shard():
            dims.append(dim)
    return (tensor.device_mesh, tuple(dims)) if dims else None


def _reduce_over_shards(partials: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    """Combine per-tensor partial results (`op` "sum" or "max") into the result over the unsharded tensors.

    `partials[i]` is tensor i's result on this rank's local shard (a 0-d tensor). Partials of plain tensors
    are combined locally; partials of DTensors are combined per (mesh, sharded dims) and all-reduced over
    each sharded mesh dimension (Replicate dims hold identical data and are not reduced).
    The single place where sharded reductions communicate.
    """
    combine = torch.sum if op == "sum" else torch.amax
    groups: dict = {}
    for partial, tensor in zip(partials, tensors):
        groups.setdefault(_shard_key(tensor), []).append(partial)
    results = []
    for key, values in groups.items():
        value = combine(torch.stack(values))
        if key is not None:
            import torch.distributed as dist

            mesh, dims = key
            reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
            for dim in dims:
                dist.all_reduce(value, op=reduce_op, group=mesh.get_group(dim))
        results.append(value)
    return combine(torch.stack(results)) if len(results) > 1 else results[0]


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` (a tensor of `reference`'s global shape, identical on every rank, e.g. noise drawn from a shared
    seed) laid out like `reference`: a DTensor holding this rank's slice when `reference` is sharded, else `full`.
    No communication."""
    if not is_sharded(reference):
        return full
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if tuple(full.shape) != tuple(reference.shape):
        raise ValueError(f"shard_like needs the global shape {tuple(reference.shape)}, got {tuple(full.shape)}.")
    local_shape, offset = compute_local_shape_and_global_offset(
        reference.shape, reference.device_mesh, reference.placements
    )
    index = tuple(slice(start, start + size) for start, size in zip(offset, local_shape))
    local = full[index].to(device=reference.to_local().device).contiguous()
    return DTensor.from_local(
        local, reference.device_mesh, reference.placements, run_check=False, shape=reference.shape,
        stride=reference.stride(),
    )


def from_local_like(local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """This rank's shard (a plain tensor, e.g. read back from this rank's checkpoint file) as a DTensor laid out
    like `reference`; unchanged when `reference` is not sharded or `local` already is. No communication."""
    if not is_sharded(reference) or is_sharded(local):
        return local
    from torch.distributed.tensor import DTensor

    expected = tuple(reference.to_local().shape)
    if tuple(local.shape) != expected:
        raise ValueError(
            f"A saved SAM-variant state shard has shape {tuple(local.shape)}, but this rank's shard of the parameter "
            f"is {expected}: resume with the same number of processes and FSDP layout the checkpoint was saved with."
        )
    return DTensor.from_local(
        local.to(device=reference.to_local().device), reference.device_mesh, reference.placements, run_check=False,
        shape=reference.shape, stride=reference.stride(),
    )


def local_state(value):
    """`value` (nested dicts / lists / tuples of tensors, e.g. a variant's state) with every DTensor replaced by a
    copy of this rank's shard: what a per-rank checkpoint file holds (`from_local_like` puts it back)."""
    if is_sharded(value):
        return value.to_local().detach().clone()
    if isinstance(value, dict):
        return {k: local_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local_state(v) for v in value)
    return value


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of `tensors`, computed in float32 or wider (over the shards for DTensors)."""
    if not tensors:
        return torch.zeros(())
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    # accumulate half-precision tensors in float32 (bf16 per-tensor norms would keep ~3 digits)
    if not any(is_sharded(t) for t in tensors):
        norms = torch._foreach_norm(list(tensors), 2.0, dtype=dtype)
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)
    norms = torch._foreach_norm(local_tensors(tensors), 2.0, dtype=dtype)
    return torch.sqrt(_reduce_over_shards([n * n for n in norms], tensors, "sum"))


def global_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """<a, b> over the concatenation of the tensors, in float32 or wider (over the shards for DTensors)."""
    if len(a) != len(b):
        raise ValueError(f"global_dot needs aligned lists, got {len(a)} and {len(b)} tensors.")
    if not a:
        return torch.zeros(())
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    partials = [
        torch.sum(x.to(dtype) * y.to(dtype)) for x, y in zip(local_tensors(a), local_tensors(b))
    ]
    return _reduce_over_shards(partials, a, "sum")


def global_max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |x| over all entries of `tensors` (over the shards for DTensors); inf/nan propagate."""
    if not tensors:
        return torch.zeros(())
    local = local_tensors(tensors)
    filled = [t for t in local if t.numel()]  # the inf-norm of an empty shard is undefined: it counts as 0
    maxima = iter(torch._foreach_norm(filled, float("inf")) if filled else [])
    zero = torch.zeros((), dtype=local[0].dtype, device=local[0].device)
    return _reduce_over_shards([next(maxima) if t.numel() else zero for t in local], tensors, "max")


def _rescale_for_norm_(grads: list[torch.Tensor]) -> float:
    """Divide g in place by its largest magnitude; returns that divisor (1.0 if nothing to do).

    Used when the squares in ||g|| overflow although every entry is finite (e.g. a large fp16
    loss scale): e does not depend on the scale of g. Returns inf/nan if an entry is not finite.
    """
    largest = float(global_max_abs(grads))
    if not math.isfinite(largest):
        return largest
    if largest == 0.0:
        return 1.0
    torch._foreach_mul_(local_tensors(grads), 1.0 / largest)
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
    torch._foreach_mul_(local_tensors(grads), factor)
    return PerturbationResult(applied=True, grad_norm=grad_norm, perturbation_norm=global_norm(grads))


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor], perturbation: list[torch.Tensor | None], *, release: bool = False
) -> list[torch.Tensor]:
    """w <- w + e in place (works for views into flat buffers); returns the backups of w.

    Works in chunks of at most `_SCRATCH_NUMEL` elements. With `release=True` the entries of the
    `perturbation` list are set to None as they are consumed, so e and the backups never both
    exist in full: the peak is one copy of the parameters plus one chunk. For DTensors (FSDP2) only the
    local shards are touched and the backups are local tensors.
    """
    backups: list[torch.Tensor] = []
    params = local_tensors([p.detach() for p in params])
    for group in _chunks(range(len(params)), params, _SCRATCH_NUMEL):
        weights = [params[i] for i in group]
        backups.extend(torch._foreach_mul(weights, 1.0))  # a fused clone
        increments = local_tensors([perturbation[i] for i in group])
        torch._foreach_add_(weights, [e.to(w.dtype) for e, w in zip(increments, weights)])
        del increments
        if release:
            for i in group:
                perturbation[i] = None
    return backups


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor]) -> None:
    """Copy the backups back in place (never by subtracting e, which drifts in low precision)."""
    if params:
        torch._foreach_copy_(local_tensors([p.detach() for p in params]), list(backups))


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
    torch._foreach_copy_(local_tensors(grads), local_tensors(scaled))  # _foreach_copy_ takes no DTensors
    torch._foreach_mul_(grads, factor)
    return PerturbationResult(applied=True, grad_norm=grad_norm, perturbation_norm=global_norm(grads))


def filterwise_gaussian(
    weights: Sequence[torch.Tensor], sigma: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """Random weight perturbation: for each row i of a matrix W (out x in...), e_i ~ N(0, sigma^2 ||W_i||^2 / n)
    with n the row's size (Flat-LoRA, Li et al., 2024); 1-D tensors (biases, norms) get e = 0.

    The noise of tensor k is drawn, in list order, with `torch.randn(W.shape, generator=generator)` on CPU
    in float32 (so every device and rank that seeds the generator alike draws the same e). For a DTensor
    (an FSDP2 shard) the noise is drawn in the global shape, cut to this rank's slice (`shard_like`) and
    scaled by the filter norms computed with DTensor ops: e equals the unsharded one.
    """
    noise = []
    for w in weights:
        if w.dim() < 2:
            noise.append(torch.zeros_like(w))
            continue
        z = torch.randn(tuple(w.shape), generator=generator, dtype=torch.float32)
        z = shard_like(z, w) if is_sharded(w) else z.to(w.device)
        row_size = math.prod(w.shape[1:])
        norms = torch.linalg.vector_norm(w.detach(), dim=tuple(range(1, w.dim())), dtype=torch.float32)
        std = sigma * norms / math.sqrt(row_size)
        noise.append(z.mul_(std.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
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
