"""FSDP2 (`torch.distributed.fsdp.fully_shard`) plumbing for SAM in `SAFTTrainer`.

Under FSDP2 every trainable parameter is a sharded DTensor; forward and backward run on unsharded
copies that FSDP all-gathers and frees again, and FSDP's post-backward hooks reduce-scatter their
gradients into the sharded `.grad` (or, with gradient sync off during accumulation, keep them unsharded
until the last micro-batch).

SAM's first pass (`FirstPass`) is an ordinary backward with FSDP's sync on, run after every gradient
slot has been emptied and stashed: FSDP reduce-scatters the first-pass gradient with its own collectives
and memory profile, each rank finds its shard of the mean gradient in `.grad`, takes it out, and the
real gradients (earlier micro-batches' sharded sums and FSDP's pending unsharded ones) are put back.
The perturbation is thus the synced one (from the mean gradient): a per-rank perturbation would need
every rank to run its forward on its own full perturbed weights, which sharding rules out (the same
reason ZeRO-3 syncs). Each rank perturbs and restores its own shard in place; `reshard` makes sure no
unsharded copy gathered before a weight change is reused. Every read of FSDP2 internals is in this
module (`_param_groups`, the groups' `reduce_grads`/`all_reduce_grads` flags, `FSDPParam`'s
`_unsharded_param` and `unsharded_accumulated_grad`; torch 2.13).
"""

from __future__ import annotations

from typing import Sequence

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


class FirstPass:
    """SAM's first pass through FSDP2's own gradient reduction, isolated from the real gradients.

    As a context manager around forward + `backward(loss)`: on entry every gradient slot is emptied
    and stashed (each trainable parameter's sharded `.grad`, and the unsharded gradients FSDP holds
    back for the last micro-batch's reduce-scatter under gradient accumulation) and FSDP's gradient
    sync is turned on; `backward` runs an ordinary backward, so FSDP reduce-scatters this pass's
    gradient per group, with its own communication, memory profile and reduce_dtype, into the empty
    sharded slots, and returns those shards (each rank's shard of the mean over ranks, DTensors laid
    out like the parameters; None where a parameter got no gradient). On exit the stashed gradients
    and sync flags are put back, whatever happened. Plain (non-FSDP) trainable parameters get their
    gradient all-reduced (mean) so that every returned gradient is synced.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]):
        self.model = model
        self.params = list(params)
        # FSDP reduces every trainable parameter's gradient, not only the ones asked for (a variant may
        # take the first pass for a subset, e.g. ESAM): all their slots are emptied and restored
        wanted = {id(p) for p in self.params}
        self._all = self.params + [p for p in model.parameters() if p.requires_grad and id(p) not in wanted]
        self._stash: list = []

    def __enter__(self) -> "FirstPass":
        for module in fsdp_modules(self.model):
            for group in _param_groups(module):
                self._stash.append((group, "reduce_grads", group.reduce_grads))
                group.reduce_grads = True
                if hasattr(group, "all_reduce_grads"):
                    self._stash.append((group, "all_reduce_grads", group.all_reduce_grads))
                    group.all_reduce_grads = True
                for fsdp_param in group.fsdp_params:
                    pending = getattr(fsdp_param, "unsharded_accumulated_grad", None)
                    if pending is not None:
                        self._stash.append((fsdp_param, "unsharded_accumulated_grad", pending))
                        fsdp_param.unsharded_accumulated_grad = None
                    unsharded = getattr(fsdp_param, "_unsharded_param", None)
                    if unsharded is not None and unsharded.grad is not None:
                        self._stash.append((unsharded, "grad", unsharded.grad))
                        unsharded.grad = None
        for p in self._all:
            if p.grad is not None:
                self._stash.append((p, "grad", p.grad))
                p.grad = None
        return self

    def backward(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """An ordinary backward of `loss`; returns the reduced gradient shards (and takes them out of `.grad`)."""
        loss.backward()
        grads = [p.grad for p in self.params]
        for p in self._all:
            p.grad = None
        replicated = [i for i, (p, g) in enumerate(zip(self.params, grads)) if g is not None and not _is_dtensor(p)]
        if replicated:
            mean_over_replicas_([grads[i] for i in replicated])
        return grads

    def __exit__(self, *exc) -> None:
        for p in self._all:  # a failed backward may have left partial gradients behind
            p.grad = None
        for owner, name, value in reversed(self._stash):
            setattr(owner, name, value)
        self._stash.clear()


def _is_dtensor(t) -> bool:
    from .sharpness import is_sharded

    return is_sharded(t)


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
