"""FSDP2 (`torch.distributed.fsdp.fully_shard`) plumbing for SAM's first pass in `SAFTTrainer`.

Under FSDP2 every trainable parameter is a sharded DTensor; forward and backward run on unsharded
copies that FSDP all-gathers into leaf tensors of its own (`FSDPParam._unsharded_param`) and frees
again, and FSDP's post-backward hook reduce-scatters their `.grad` into the sharded `.grad`.

SAM's first pass therefore:
- runs with gradient sync off on every FSDP module (`set_requires_gradient_sync(False)`, the previous
  per-group values restored afterwards), so FSDP's post-backward never reduce-scatters anything in it
  (not even gradients of earlier micro-batches that it holds unsharded under gradient accumulation);
- takes `torch.autograd.grad` with respect to the unsharded leaves (the sharded DTensors are not in the
  autograd graph), which never writes `.grad`, so FSDP has nothing to reduce and its accumulation state
  is untouched;
- reduce-scatters the resulting full local gradients itself (`mean_gradient_shards`): each rank keeps
  its shard of the mean over ranks, as a DTensor laid out like the parameter, in the parameter's dtype
  (float32 under a bf16 `MixedPrecisionPolicy`).

The perturbation is thus the synced one (computed from the mean gradient): a per-rank perturbation
would need every rank to run its forward on its own full perturbed weights, which sharding rules out
(the same reason ZeRO-3 syncs). The reads of FSDP2 internals are all in this module.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of `model` that `fully_shard` was applied to (outermost first)."""
    cls = _fsdp_module_class()
    if cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def is_fsdp2(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def _param_groups(module: nn.Module) -> list:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.8: one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def reshard(model: nn.Module) -> None:
    """Free every unsharded parameter and register the sharded ones (no-op where already sharded).

    Called before SAM reads the parameters and after it restores them, so no forward can run on an
    unsharded copy gathered before the weights changed (e.g. with reshard_after_backward=False)."""
    for module in fsdp_modules(model):
        module.reshard()


@contextlib.contextmanager
def gradient_sync_off(model: nn.Module) -> Iterator[None]:
    """FSDP's gradient reduction off for the duration (the previous per-group flags restored on exit)."""
    saved = []
    for module in fsdp_modules(model):
        for group in _param_groups(module):
            saved.append((group, group.reduce_grads, getattr(group, "all_reduce_grads", None)))
            group.reduce_grads = False
            if hasattr(group, "all_reduce_grads"):
                group.all_reduce_grads = False
    try:
        yield
    finally:
        for group, reduce_grads, all_reduce_grads in saved:
            group.reduce_grads = reduce_grads
            if all_reduce_grads is not None:
                group.all_reduce_grads = all_reduce_grads


def autograd_targets(model: nn.Module, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the forward actually used for `params` (FSDP's unsharded leaves), to differentiate.

    Call after the forward. A parameter FSDP does not manage is its own target; one whose module never
    ran has no unsharded leaf yet and stays the sharded parameter (autograd.grad then gives None)."""
    leaves = {}
    for module in fsdp_modules(model):
        for group in _param_groups(module):
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    leaves[id(fsdp_param.sharded_param)] = unsharded
    return [leaves.get(id(p), p) for p in params]


@torch.no_grad()
def mean_gradient_shards(
    params: Sequence[torch.Tensor], grads: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """Each rank's full local gradients -> its shard of their mean over ranks, laid out like `params`.

    A reduce-scatter per sharded parameter (an all-reduce for plain replicated ones), in the parameter's
    dtype (so float32 for float32 master weights, whatever the compute dtype). None (unused on this
    rank) counts as zeros so that every rank issues the same collectives. `grads` is consumed (its
    entries set to None as they are reduced) to keep only one full gradient alive at a time beyond
    what autograd returned.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial

    from .sharpness import is_sharded

    shards = []
    for i, p in enumerate(params):
        g, grads[i] = grads[i], None
        if not is_sharded(p):
            g = torch.zeros_like(p) if g is None else g.to(p.dtype)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
            shards.append(g)
            continue
        mesh = p.device_mesh
        if g is None:
            g = torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device)
        g = g.to(p.dtype).contiguous()
        partial = DTensor.from_local(g, mesh, [Partial("sum")] * mesh.ndim, run_check=False, shape=p.shape,
                                     stride=g.stride())
        shard = partial.redistribute(mesh, p.placements)
        shard.to_local().div_(mesh.size())
        home = p.to_local().device
        if shard.to_local().device != home:  # CPU-offloaded shards: e is added where the weights live
            shard = DTensor.from_local(shard.to_local().to(home), mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
        shards.append(shard)
        del g, partial
    return shards


def mean_over_replicas_(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`SAMStep.all_reduce_mean` for a list holding DTensors: the mean over ranks that hold the same slice.

    A DTensor's local shards differ between the ranks of a sharded mesh dimension (they are pieces of one
    tensor, not copies to average), so only its Replicate mesh dims are averaged (none for plain FSDP:
    a no-op); plain tensors are averaged over every rank. In place; returns the list."""
    import torch.distributed as dist

    from .sharpness import is_sharded

    tensors = list(tensors)
    world = dist.get_world_size() if dist.is_initialized() else 1
    for t in tensors:
        if not is_sharded(t):
            if world > 1:
                dist.all_reduce(t)
                t.div_(world)
            continue
        local = t.to_local()
        for dim, placement in enumerate(t.placements):
            if placement.is_replicate() and t.device_mesh.size(dim) > 1:
                dist.all_reduce(local, group=t.device_mesh.get_group(dim))
                local.div_(t.device_mesh.size(dim))
    return tensors
