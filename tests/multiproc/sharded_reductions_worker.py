"""Worker launched by tests/test_trainer_fsdp2.py with torchrun (2 processes, gloo, CPU).

Checks that saft_hf.sharpness gives on DTensor shards (FSDP2's layout: Shard(0), uneven, a rank with an
empty shard; also Shard(1)) what it gives on the full tensors: global_norm / global_dot / global_max_abs,
the SAM/ASAM perturbation (incl. the rescaled path for a norm whose squares overflow), perturb_/restore_
(exact), shard_like; that SAMStep.all_reduce_mean (fsdp2.mean_over_replicas_) leaves shards alone; and the
variants' helpers: RWP's filter-wise noise, Fisher-SAM's perturbation, LookSAM's projection and reuse, GSAM's
combination, and the per-rank state round trip (local_state / from_local_like).
Rank 0 writes {check: max abs difference} to OUT/sharded_reductions.json.

    torchrun --nproc_per_node 2 tests/multiproc/sharded_reductions_worker.py --out DIR
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from saft_hf import fsdp2, sharpness


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)  # same full tensors on every rank
    shapes = [(3, 4), (1, 5), (7,), (2, 3, 2)]  # 3 rows over 2 ranks: uneven; 1 row: rank 1 holds nothing
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    placements = [[Shard(0)]] * 3 + [[Shard(1)]]

    def shard(tensors):
        return [distribute_tensor(t.clone(), mesh, p) for t, p in zip(tensors, placements)]

    def full(tensors):
        return [t.full_tensor() for t in tensors]

    def diff(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    checks = {}
    sp, sg = shard(params), shard(grads)
    assert sp[1].to_local().numel() == (5 if rank == 0 else 0)
    checks["global_norm"] = abs(float(sharpness.global_norm(sg)) - float(sharpness.global_norm(grads)))
    checks["global_dot"] = abs(float(sharpness.global_dot(sg, sp)) - float(sharpness.global_dot(grads, params)))
    checks["global_max_abs"] = abs(float(sharpness.global_max_abs(sg)) - float(sharpness.global_max_abs(grads)))
    checks["global_norm_vs_torch"] = abs(
        float(sharpness.global_norm(sg)) - float(torch.cat([x.flatten() for x in grads]).norm())
    )

    scaled = [True, False, True, True]
    for name, scale in (("asam", 1.0), ("asam_overflow", 1e30)):  # 1e30: the squares overflow float32
        e_full = [x.clone() * scale for x in grads]
        e_shard = shard(e_full)
        r_full = sharpness.perturbation_(params, e_full, rho=0.5, eta=0.01, scaled=scaled)
        r_shard = sharpness.perturbation_(sp, e_shard, rho=0.5, eta=0.01, scaled=scaled)
        assert r_full.applied and r_shard.applied, name
        checks[f"perturbation_{name}"] = diff(full(e_shard), e_full)
        checks[f"perturbation_norm_{name}"] = abs(float(r_shard.perturbation_norm) - float(r_full.perturbation_norm))
    e_ref = sharpness.reference_perturbation(params, grads, rho=0.5, eta=0.01, scaled=scaled)
    checks["perturbation_vs_reference"] = diff(full(e_shard), e_ref)

    weights = shard(params)
    backups = sharpness.perturb_(weights, shard(e_ref))
    checks["perturbed"] = diff(full(weights), [p + e for p, e in zip(params, e_ref)])
    sharpness.restore_(weights, backups)
    checks["restored_exactly"] = diff(full(weights), params)

    noise = [torch.randn(s, generator=torch.Generator().manual_seed(7)) for s in shapes]
    checks["shard_like"] = diff(full([sharpness.shard_like(n, p) for n, p in zip(noise, sp)]), noise)

    # SAMStep.all_reduce_mean on shards: they are pieces of one synced tensor, nothing to average
    kept = shard(grads)
    fsdp2.mean_over_replicas_(kept)
    checks["all_reduce_mean_leaves_shards"] = diff(full(kept), grads)

    # the SAM variants' helpers on shards equal them on the full tensors
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    checks["filterwise_gaussian"] = diff(
        full(sharpness.filterwise_gaussian(sp, 0.05, gen())), sharpness.filterwise_gaussian(params, 0.05, gen())
    )
    fisher_full, fisher_shard = [x.clone() for x in grads], shard(grads)
    sharpness.fisher_perturbation_(fisher_full, rho=0.1, eta=1.0)
    sharpness.fisher_perturbation_(fisher_shard, rho=0.1, eta=1.0)
    checks["fisher_perturbation"] = diff(full(fisher_shard), fisher_full)
    checks["orthogonal_component"] = diff(
        full(sharpness.orthogonal_component(sg, sp)), sharpness.orthogonal_component(grads, params)
    )
    reuse_full, reuse_shard = [x.clone() for x in grads], shard(grads)
    sharpness.looksam_reuse_(reuse_full, params, 0.7)
    sharpness.looksam_reuse_(reuse_shard, sp, 0.7)
    checks["looksam_reuse"] = diff(full(reuse_shard), reuse_full)
    gsam_full, gsam_shard = [x.clone() for x in grads], shard(grads)
    sharpness.gsam_combine_(gsam_full, params, 0.4)
    sharpness.gsam_combine_(gsam_shard, sp, 0.4)
    checks["gsam_combine"] = diff(full(gsam_shard), gsam_full)
    saved = sharpness.local_state({"direction": sg})  # what this rank's checkpoint file holds
    assert not any(sharpness.is_sharded(t) for t in saved["direction"])
    restored = [sharpness.from_local_like(t, p) for t, p in zip(saved["direction"], sp)]
    checks["state_round_trip"] = diff(full(restored), grads)

    if rank == 0:
        with open(os.path.join(out, "sharded_reductions.json"), "w") as handle:
            json.dump(checks, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
