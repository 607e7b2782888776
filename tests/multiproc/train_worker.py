"""Worker launched by tests/test_trainer_multiprocess.py with torchrun (gloo, CPU).

Trains TinyClassifier with SAFTTrainer under DDP or DeepSpeed ZeRO-1/2/3, records every
micro-batch each rank saw, and saves batches (per rank) + initial and final weights (rank 0)
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


class RecordingTrainer(SAFTTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorded.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


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


def run_one(out: str, backend: str, grad_accum: int, sync: bool, steps: int, rho: float, variant: str,
            interval: int = 1) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a fresh accelerator (DDP or DeepSpeed) for every run
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
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
        save_strategy="no",
        logging_steps=1,
        seed=3,
        disable_tqdm=True,
        sam_rho=rho,
        sam_variant=variant,
        sam_interval=interval,
        sam_sync_perturbation=sync,
        deepspeed=deepspeed_config(int(backend[-1])) if backend.startswith("zero") else None,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=TinyDataset(n=64))
    trainer.recorded = []
    trainer.train()

    rank = trainer.args.process_index
    os.makedirs(out, exist_ok=True)
    torch.save(trainer.recorded, os.path.join(out, f"batches_rank{rank}.pt"))
    module = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if backend == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            final = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        final = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if rank == 0:
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        strategy = {"class": type(trainer.sam_strategy).__name__, "state": trainer.sam_strategy.state_dict()}
        torch.save(
            {"init": init, "final": final, "logs": logs, "world": trainer.args.world_size, "strategy": strategy},
            os.path.join(out, "result.pt"),
        )
    torch.distributed.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="backend:grad_accum:local|sync[:variant[:interval]] ...")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.5)
    cli = parser.parse_args()
    for module in filter(None, os.environ.get("SAFT_TEST_SAM_VARIANT_MODULES", "").split(",")):
        importlib.import_module(module.strip())  # registers its variants
    for spec in cli.runs:
        backend, grad_accum, mode, *rest = spec.split(":")
        assert backend in ("ddp", "zero1", "zero2", "zero3") and mode in ("local", "sync") and len(rest) <= 2, spec
        variant = rest[0] if rest else "asam"
        interval = int(rest[1]) if len(rest) > 1 else 1
        run_one(os.path.join(cli.out, spec.replace(":", "_")), backend, int(grad_accum), mode == "sync", cli.steps,
                cli.rho, variant, interval)


if __name__ == "__main__":
    main()
