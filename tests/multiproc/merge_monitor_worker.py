"""Worker launched by tests/test_callbacks_multiprocess.py with torchrun (2 processes, gloo, CPU).

Trains the tiny BERT with SAFTTrainer (ASAM) under DDP with MergeMonitorCallback (every step, evaluation
and best-checkpoint selection every 2 steps) and writes, per rank, OUT/rank<r>.json (evaluator
calls, monitor log entries, best checkpoint, global step) and OUT/final_rank<r>.pt (final weights).

    torchrun --nproc_per_node 2 --master_port P tests/multiproc/merge_monitor_worker.py --out DIR
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multiproc.tiny_bert import MergedEvaluator, TokenDataset, encoder_state, eval_tasks, perturbed_encoder, tiny_bert  # noqa: E402
from saft_hf import MergeMonitorCallback, SAFTTrainer, SAFTTrainingArguments  # noqa: E402


class SlowEvaluator(MergedEvaluator):
    """Rank 0's evaluation takes a while: the other rank must wait for it, not run ahead."""

    def evaluate(self, state_dict, max_examples=None):
        time.sleep(0.3)
        return super().evaluate(state_dict, max_examples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    model = tiny_bert()
    theta0 = encoder_state(model)
    other = os.path.join(out, "other_task")
    if int(os.environ.get("RANK", 0)) == 0:
        perturbed_encoder(theta0, seed=1).save_pretrained(other)
    if not torch.distributed.is_initialized():  # early, so rank 1 can wait for rank 0's checkpoint
        torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()
    evaluator = SlowEvaluator(model, eval_tasks())
    cb = MergeMonitorCallback({"other": other}, evaluator, every_n_steps=1, pretrained=theta0,
                              finetuned_accuracy={"task_a": 0.75, "task_b": 0.6})
    args = SAFTTrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        lr_scheduler_type="constant", use_cpu=True, report_to="none", logging_steps=2, eval_strategy="steps",
        eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
        metric_for_best_model="merged_mean_normalized", seed=3, disable_tqdm=True,
        sam_rho=0.5, sam_adaptive=True)
    trainer = SAFTTrainer(model=model, args=args, train_dataset=TokenDataset(seed=1), eval_dataset=TokenDataset(n=8, seed=9),
                      callbacks=[cb])
    trainer.train()
    rank = trainer.args.process_index
    entries = [e for e in trainer.state.log_history if "merged_mean_accuracy" in e]
    result = {"rank": rank, "world": trainer.args.world_size, "calls": evaluator.calls, "entries": entries,
              "records": [{"step": r["step"], "seconds": r["seconds"]} for r in cb.records],
              "best_model_checkpoint": os.path.basename(trainer.state.best_model_checkpoint or ""),
              "best_metric": trainer.state.best_metric, "global_step": trainer.state.global_step,
              "eval_entries": [e for e in trainer.state.log_history if "eval_loss" in e]}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, f"final_rank{rank}.pt"))


if __name__ == "__main__":
    main()
