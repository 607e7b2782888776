"""Worker launched by tests/test_trainer_multiprocess.py with torchrun (gloo, CPU).

Trains TinyClassifier with SAFTTrainer under DDP, DeepSpeed ZeRO-1/2/3 or FSDP2 (`fsdp2`, and
`fsdp2bf16` with a MixedPrecisionPolicy param_dtype=bf16, reduce_dtype=float32), records every
micro-batch each rank saw and how far each training_step left the weights from where it found them
(the restore must be exact), and saves batches (per rank) + initial and final weights (rank 0)
into OUT/<run name>/. Several runs share one launch (the imports dominate the cost); each run is
`backend:grad_accum:local|sync[:sam_variant[:sam_interval]]` (variant default "asam", interval 1), DDP runs first (DeepSpeed
leaves process-wide state behind). SAFT_TEST_SAM_VARIANT_MODULES (comma-separated module names) are
imported first, so a variant registered in test code can be named in a run.

    SAFT_TEST_SAM_VARIANT_MODULES=multiproc.toy_sam_variant \
    torchrun --nproc_per_node 2 --master_port P tests/multiproc/train_worker.py \
        --out DIR --runs ddp:1:local ddp:2:sync zero2:2:local zero3:2:sync ddp:2:local:test-signsam
"""

import argparse
import copy
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multiproc.sam_reference import TinyClassifier, TinyDataset  # noqa: E402
from saft_hf import SAFTTrainer, SAFTTrainingArguments  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402


def _local(p):
    return p.to_local() if isinstance(p, DTensor) else p


class RecordingTrainer(SAFTTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorded.append({k: v.detach().clone() for k, v in inputs.items()})
        if self._zero_stage == 3:  # partitioned weights: nothing local to compare (restored inside the gather)
            return super().training_step(model, inputs, num_items_in_batch)
        before = [_local(p).detach().clone() for p in model.parameters()]
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the optimizer steps outside training_step: SAM must leave the weights exactly as it found them
        after = [_local(p).detach() for p in model.parameters()]
        self.restore_errors.append(
            max([float((a.float() - b.float()).abs().max()) for a, b in zip(after, before) if a.numel()] or [0.0])
        )
        return loss

    def _sam_first_pass(self, model, *args, **kwargs):
        # the first pass must leave every gradient alone: .grad (DDP, FSDP2's sharded grads) and, under
        # FSDP2, the unsharded gradients FSDP holds back for the last micro-batch's reduce-scatter
        before = _gradient_state(model)
        result = super()._sam_first_pass(model, *args, **kwargs)
        after = _gradient_state(model)
        self.first_pass_grad_changes += int(
            len(before) != len(after)
            or any((a is None) != (b is None) or (a is not None and not torch.equal(a, b))
                   for a, b in zip(after, before))
        )
        self.pending_unsharded_grads += int(any(g is not None for g in before[len(list(model.parameters())):]))
        return result


def _gradient_state(model):
    """Clones of every .grad (local shards), then of FSDP2's pending unsharded gradients."""
    from saft_hf import fsdp2

    grads = [p.grad for p in model.parameters()]
    for module in fsdp2.fsdp_modules(model):
        for group in fsdp2._param_groups(module):
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                grads.append(getattr(fsdp_param, "unsharded_accumulated_grad", None))
                grads.append(None if unsharded is None else unsharded.grad)
    return [None if g is None else _local(g).detach().clone() for g in grads]


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
    }


def allow_fsdp_on_cpu() -> None:
    """Accelerate (1.15) only turns an FSDP plugin on for accelerator devices (CUDA, XPU, ...); on this CPU-only
    machine it would silently fall back to DDP. Test-only: make a MULTI_CPU state with an FSDP plugin an FSDP
    state, exactly as accelerate does for GPUs (FSDP2 itself runs on CPU with gloo)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState, "_saft_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # every AcceleratorState() re-copies distributed_type from PartialState: re-apply each time
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if fsdp_plugin is not None and self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = __init__
    AcceleratorState._saft_fsdp_on_cpu = True


def run_one(out: str, backend: str, grad_accum: int, sync: bool, steps: int, rho: float, variant: str,
            interval: int = 1, resume_check: bool = False) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a fresh accelerator (DDP, DeepSpeed or FSDP2) for every run
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
    fsdp = backend.startswith("fsdp2")
    if fsdp:
        allow_fsdp_on_cpu()
    bf16 = backend == "fsdp2bf16"
    compute_dtypes = []  # dtype of fc1's weight as the forward sees it (bf16 under the mixed-precision policy)
    model.fc1.register_forward_pre_hook(lambda module, args: compute_dtypes.append(str(module.weight.dtype)))
    args = SAFTTrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        # resume_check: a checkpoint after every step; a second trainer resumes from checkpoint-1 (below)
        save_strategy="steps" if resume_check else "no",
        save_steps=1,
        logging_steps=1,
        seed=3,
        disable_tqdm=True,
        sam_rho=rho,
        sam_variant=variant,
        sam_interval=interval,
        sam_sync_perturbation=sync,
        deepspeed=deepspeed_config(int(backend[-1])) if backend.startswith("zero") else None,
        # fc1 and fc2 get their own FSDP2 groups, the LayerNorm stays in the root's (min_num_params=20)
        fsdp=fsdp or None,
        # resume_check: sharded checkpoints (torch 2.13's full-state-dict optimizer load needs a tensor in the
        # optimizer state, which plain SGD has none of)
        fsdp_config=({"version": 2, "auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 20}
                     | ({"state_dict_type": "SHARDED_STATE_DICT"} if resume_check else {})) if fsdp else None,
        bf16=bf16,
    )
    if bf16:  # param_dtype bf16 for compute, float32 gradient reduction and master weights
        args.fsdp_plugin_args["mixed_precision_policy"] = {
            "param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "output_dtype": torch.float32,
        }
    trainer = RecordingTrainer(model=model, args=args, train_dataset=TinyDataset(n=64))
    trainer.recorded = []
    trainer.restore_errors = []
    trainer.first_pass_grad_changes = 0
    trainer.pending_unsharded_grads = 0  # first passes that ran while FSDP held unreduced gradients
    trainer.train()

    resumed_final = None
    if resume_check:  # resumed from checkpoint-1 (weights, optimizer, the variant's per-rank state): same end
        AcceleratorState._reset_state()
        torch.manual_seed(0)
        again = RecordingTrainer(model=TinyClassifier(), args=args, train_dataset=TinyDataset(n=64))
        again.recorded, again.restore_errors = [], []
        again.first_pass_grad_changes = again.pending_unsharded_grads = 0
        again.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-1"))
        resumed_final = _full_state_dict(again, backend)
        checkpoint_files = sorted(os.listdir(os.path.join(args.output_dir, "checkpoint-1")))

    rank = trainer.args.process_index
    os.makedirs(out, exist_ok=True)
    torch.save(trainer.recorded, os.path.join(out, f"batches_rank{rank}.pt"))
    final = _full_state_dict(trainer, backend)
    if rank == 0:
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        from saft_hf import sharpness  # FSDP2: DTensor state as this rank's shards, like a checkpoint file

        strategy = {"class": type(trainer.sam_strategy).__name__,
                    "state": sharpness.local_state(trainer.sam_strategy.state_dict())}
        torch.save(
            {"init": init, "final": final, "logs": logs, "world": trainer.args.world_size, "strategy": strategy,
             "restore_errors": trainer.restore_errors, "first_pass_grad_changes": trainer.first_pass_grad_changes,
             "pending_unsharded_grads": trainer.pending_unsharded_grads, "compute_dtypes": sorted(set(compute_dtypes)),
             "parameter_types": sorted({type(p).__name__ for p in trainer.model_wrapped.parameters()}),
             "resumed_final": resumed_final, "checkpoint_files": checkpoint_files if resume_check else None},
            os.path.join(out, "result.pt"),
        )
    torch.distributed.barrier()


def _full_state_dict(trainer, backend: str) -> dict:
    """The trained weights as full tensors (gathered under ZeRO-3 and FSDP2), on every rank."""
    module = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if backend == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in module.state_dict().items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="backend:grad_accum:local|sync[:variant[:interval]] ...")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--resume-check", action="store_true",
                        help="also resume each run from its checkpoint-1 and record the resumed final weights")
    cli = parser.parse_args()
    for module in filter(None, os.environ.get("SAFT_TEST_SAM_VARIANT_MODULES", "").split(",")):
        importlib.import_module(module.strip())  # registers its variants
    for spec in cli.runs:
        backend, grad_accum, mode, *rest = spec.split(":")
        backends = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "fsdp2bf16")
        assert backend in backends and mode in ("local", "sync") and len(rest) <= 2, spec
        variant = rest[0] if rest else "asam"
        interval = int(rest[1]) if len(rest) > 1 else 1
        run_one(os.path.join(cli.out, spec.replace(":", "_")), backend, int(grad_accum), mode == "sync", cli.steps,
                cli.rho, variant, interval, cli.resume_check)


if __name__ == "__main__":
    main()
