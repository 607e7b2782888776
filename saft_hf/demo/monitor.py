"""`saft-hf demo --monitor N`: merged accuracy against training step, per fine-tuning method.

A second pass after the study's fine-tuning (the monitor needs the other tasks' finished task
vectors): for the first seed and every method, the LAST task is fine-tuned again exactly as in the
study (same seed, same data order; the result is not saved, the cached checkpoint stays), with
`saft_hf.MergeMonitorCallback` merging its live task vector every N steps with the other tasks'
fine-tuned checkpoints of the same method and seed (read lazily from disk) by task arithmetic at
the fixed coefficient `fixed_alpha` (not searched: no choice depends on the outcome), evaluated on
the first `monitor_val_size` validation examples of every task. Normalized = merged / each task's
fine-tuned model's accuracy on the same validation examples. Cost: one extra fine-tuning run per
method plus the monitor's calls (seconds per call and share of that run's time are reported).
"""
from __future__ import annotations

from pathlib import Path


def run_monitor(cfg, model_path, encoder0, heads, tasks, task_pool, pad_id, records, signature,
                output_dir: Path) -> dict:
    from saft_hf.callbacks import MergeMonitorCallback
    from saft_hf.demo import model as demo_model
    from saft_hf.demo.study import finetune_one, log

    names = list(tasks)
    current, others = names[-1], names[:-1]
    seed = cfg.seeds[0]
    n_val = cfg.monitor_val_size
    pretrained = {k: v.detach().clone() for k, v in encoder0.state_dict().items()}
    out = {"task": current, "seed": seed, "every_n_steps": cfg.monitor_every, "validation_examples": n_val,
           "merge": {"method": "task_arithmetic", "scaling": cfg.fixed_alpha}, "methods": {}}

    def evaluate(state_dict):
        return task_pool.evaluate(state_dict, "validation", names, n_val)

    for method in cfg.methods:
        ckpts = {n: records[(seed, method, n)]["checkpoint"] for n in names}
        own = {n: task_pool.evaluate(demo_model.load_encoder(ckpts[n]), "validation", [n], n_val)[n] for n in names}
        monitor = MergeMonitorCallback({n: ckpts[n] for n in others}, evaluate, cfg.monitor_every,
                                       ("task_arithmetic",), pretrained=pretrained, finetuned_accuracy=own,
                                       method_params={"task_arithmetic": {"scaling": cfg.fixed_alpha}},
                                       current_name=current)
        log(f"merge monitor: fine-tuning {current} with {method} again (seed {seed}), merged accuracy every "
            f"{cfg.monitor_every} steps")
        record = finetune_one(cfg, model_path, heads[current], tasks[current], method, seed, pad_id, None, signature,
                              callbacks=[monitor])
        out["methods"][method] = {
            "steps": [r["step"] for r in monitor.records],
            "merged_mean_accuracy": [r["metrics"]["merged_mean_accuracy"] for r in monitor.records],
            "merged_mean_normalized": [r["metrics"].get("merged_mean_normalized") for r in monitor.records],
            "sharpness": [r["metrics"].get("merge_monitor_sharpness") for r in monitor.records],
            "finetuned_validation_accuracy": own,
            "seconds_per_call": monitor.seconds_per_call, "calls": len(monitor.records),
            "share_of_training_time": monitor.share, "train_seconds": record["train_seconds"],
            "same_loss_as_study_run": record["train_loss"] == records[(seed, method, current)]["train_loss"],
        }
    out["plot"] = plot_monitor(out, Path(output_dir) / "merge_monitor.png")
    return out


def plot_monitor(result: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saft_hf.demo.report import COLORS, method_label
    from saft_hf.io_utils import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for j, (method, res) in enumerate(result["methods"].items()):
        for ax, key in zip(axes, ("merged_mean_accuracy", "merged_mean_normalized")):
            vals = [100 * v if v is not None else float("nan") for v in res[key]]
            ax.plot(res["steps"], vals, marker="o", color=COLORS[j % len(COLORS)], label=method_label(method))
    for ax, title in zip(axes, ("merged mean accuracy (%)", "merged mean normalized accuracy (%)")):
        ax.set_xlabel(f"training step of {result['task']}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"merge monitor: task arithmetic (alpha {result['merge']['scaling']:g}) of {result['task']} "
                 f"while it trains, with the other tasks' task vectors; {result['validation_examples']} "
                 "validation examples per task", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path.name
