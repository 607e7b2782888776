"""Worker launched by tests/test_trl_multiprocess.py with torchrun (gloo, CPU): SAFTSFTTrainer under DDP.

Trains the tiny Llama with SFT + ASAM, records every micro-batch (and its num_items_in_batch) each
rank saw, and saves them (per rank) plus the initial and final weights (rank 0) into OUT.

    torchrun --nproc_per_node 2 --master_port P tests/multiproc/trl_worker.py --out DIR --grad-accum 2
"""

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multiproc.tiny_lm import build_model, build_tokenizer, sft_dataset  # noqa: E402
from saft_hf.trl import SAFTSFTConfig, SAFTSFTTrainer  # noqa: E402


class RecordingTrainer(SAFTSFTTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorded.append(({k: v.detach().clone() for k, v in inputs.items()}, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.5)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(seed=0)
    init = copy.deepcopy(model.state_dict())
    args = SAFTSFTConfig(
        output_dir=os.path.join(cli.out, "trainer"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=cli.grad_accum,
        max_steps=cli.steps,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=3,
        disable_tqdm=True,
        sam_rho=cli.rho,
    )
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=sft_dataset(n=32), processing_class=build_tokenizer()
    )
    trainer.recorded = []
    trainer.train()
    rank = trainer.args.process_index
    os.makedirs(cli.out, exist_ok=True)
    torch.save(trainer.recorded, os.path.join(cli.out, f"batches_rank{rank}.pt"))
    if rank == 0:
        module = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        torch.save(
            {
                "init": init,
                "final": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "world": trainer.args.world_size,
                "tokens_across_devices": bool(trainer.args.average_tokens_across_devices),
                "logs": [e for e in trainer.state.log_history if "loss" in e],
            },
            os.path.join(cli.out, "result.pt"),
        )
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
