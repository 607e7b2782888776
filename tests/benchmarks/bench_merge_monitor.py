"""Cost of MergeMonitorCallback on the tiny test BERT (a script, not a test).

    python tests/benchmarks/bench_merge_monitor.py [--steps 60] [--every 10] [--threads 1]
        [--hidden 16 --layers 2] [--methods task_arithmetic ties]

Trains the tiny BERT of tests/multiproc/tiny_bert.py with SAFTTrainer (ASAM, rho 0.5) for --steps
steps with the monitor every --every steps (two other tasks: one checkpoint on disk, read lazily,
one in-memory task vector; evaluation on two 24-example tasks) and reports the monitor's seconds
per call and its share of the training wall time, plus the training time of the same run without
the monitor. Larger --hidden/--layers give a feel for how the cost scales with the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multiproc import tiny_bert as tb  # noqa: E402


def run(args, monitor: bool, workdir: str) -> dict:
    from saft_hf import MergeMonitorCallback, SAFTTrainer, SAFTTrainingArguments

    model = tb.tiny_bert()
    theta0 = tb.encoder_state(model)
    other = os.path.join(workdir, "other")
    if not os.path.exists(other):
        tb.perturbed_encoder(theta0, seed=1).save_pretrained(other)
    g = torch.Generator().manual_seed(2)
    tv = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in theta0.items() if v.is_floating_point()}
    cbs = []
    if monitor:
        cbs.append(MergeMonitorCallback({"c": other, "d": tv}, tb.MergedEvaluator(model, tb.eval_tasks()), args.every,
                                        methods=tuple(args.methods), pretrained=theta0,
                                        finetuned_accuracy={"task_a": 0.75, "task_b": 0.6}))
    targs = SAFTTrainingArguments(output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=8,
                                  max_steps=args.steps, learning_rate=1e-3, use_cpu=True, report_to="none",
                                  save_strategy="no", logging_steps=args.every, disable_tqdm=True, sam_rho=0.5,
                                  sam_adaptive=True, seed=0)
    trainer = SAFTTrainer(model=model, args=targs, train_dataset=tb.TokenDataset(n=256, seed=1), callbacks=cbs)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    n_params = sum(v.numel() for v in theta0.values())
    out = {"monitor": monitor, "train_seconds": round(total, 3), "encoder_params": n_params}
    if monitor:
        cb = cbs[0]
        out.update(calls=len(cb.records), seconds_per_call=round(cb.seconds_per_call, 4), share=round(cb.share, 4))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["task_arithmetic"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tb.CONFIG.update(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=2 * args.hidden)
    with tempfile.TemporaryDirectory() as d:
        run(args, True, d)  # warm-up (imports, first allocations)
        results = [run(args, False, d), run(args, True, d)]
    print(json.dumps({"config": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
