"""Cost of one ASAM step relative to one plain step, same model and batch (a script, not a test).

    python tests/benchmarks/bench_sam_step.py [--reps 30] [--threads 1] [--models bert vit]

Time: `SAFTTrainer.training_step` + `optimizer.step()` + `zero_grad()`, for a trainer with
sam_rho=0.5 (ASAM) and one with sam_rho=0 (exactly `Trainer`), each on its own copy of the model,
interleaved (alternating which goes first) after warm-up; reports the median of the per-pair ratios
and its spread (the CPU is shared, so look at the spread).

Memory: each variant runs `--mem-steps` steps in a fresh subprocess with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor block of 64 KiB or more is mmap'ed and
returned to the OS when freed and the resident set size follows live tensor memory. The peak RSS
(ru_maxrss) minus the RSS between steps (weights, optimizer state) is that variant's per-step peak
working memory; the difference ASAM - plain, in units of "one copy of the trainable parameters", is
what SAM costs on top of plain training (small tensors below 64 KiB are not tracked precisely: a few
MB of noise). Analytic answer: the backups are one copy; the first-pass gradients (which become e)
are freed right after w += e, before the second forward/backward.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(name: str, scale: str):
    """A model from a config and a fixed batch for it."""
    torch.manual_seed(0)
    big = scale == "mem"
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        hidden = 256 if big else 128
        config = BertConfig(
            vocab_size=1000, hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=4 * hidden, max_position_embeddings=128, num_labels=4,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        model = BertForSequenceClassification(config)
        ids = torch.randint(1, 1000, (8, 64))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 4, (8,))}
    elif name == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        hidden = 256 if big else 128
        config = ViTConfig(
            image_size=64, patch_size=8, num_channels=3, hidden_size=hidden, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=4 * hidden, num_labels=10,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        model = ViTForImageClassification(config)
        batch = {"pixel_values": torch.randn(8, 3, 64, 64), "labels": torch.randint(0, 10, (8,))}
    else:
        raise ValueError(f"unknown model {name!r}: use bert or vit")
    return model, batch


def make_trainer(model, rho: float, workdir: str):
    from saft_hf import SAFTTrainer, SAFTTrainingArguments

    args = SAFTTrainingArguments(
        output_dir=workdir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        sam_rho=rho, sam_variant="asam", per_device_train_batch_size=8,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trainer = SAFTTrainer(model=model, args=args, optimizers=(optimizer, None))
    trainer.current_gradient_accumulation_steps = 1

    def step(batch):
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_ratio(name: str, reps: int, warmup: int) -> dict:
    model, batch = build(name, "time")
    with tempfile.TemporaryDirectory() as workdir:
        plain = make_trainer(copy.deepcopy(model), 0.0, workdir)
        sam = make_trainer(copy.deepcopy(model), 0.5, workdir)
        for _ in range(warmup):
            plain(batch)
            sam(batch)
        plain_times, sam_times, ratios = [], [], []
        for rep in range(reps):
            order = [("plain", plain), ("sam", sam)] if rep % 2 == 0 else [("sam", sam), ("plain", plain)]
            took = {}
            for label, step in order:
                start = time.perf_counter()
                step(batch)
                took[label] = time.perf_counter() - start
            plain_times.append(took["plain"])
            sam_times.append(took["sam"])
            ratios.append(took["sam"] / took["plain"])
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "plain_ms_median": 1e3 * statistics.median(plain_times),
        "sam_ms_median": 1e3 * statistics.median(sam_times),
        "ratio_of_medians": statistics.median(sam_times) / statistics.median(plain_times),
        "ratio_median": statistics.median(ratios),
        "ratio_q1": quartiles[0],
        "ratio_q3": quartiles[2],
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def time_sharpness_ops(name: str, reps: int) -> dict:
    """The SAM-only arithmetic (e, backup, w += e, restore) on the model's parameters, per step."""
    from saft_hf import sharpness

    model, _ = build(name, "time")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    mask = sharpness.adaptive_scale_mask(names, "all")
    times = []
    for _ in range(reps):
        grads = [torch.randn_like(p) for p in params]
        start = time.perf_counter()
        sharpness.perturbation_(params, grads, rho=0.5, adaptive=True, scaled=mask)
        backups = sharpness.perturb_(params, grads, release=True)
        sharpness.restore_(params, backups)
        times.append(time.perf_counter() - start)
    return {"ops_ms_median": 1e3 * statistics.median(times)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, rho: float, steps: int) -> None:
    """Runs in a subprocess: prints {"before": rss, "peak": maxrss, "param_bytes": ...} as JSON."""
    model, batch = build(name, "mem")
    with tempfile.TemporaryDirectory() as workdir:
        step = make_trainer(model, rho, workdir)
        # the optimizer state exists in both variants; create it before measuring
        step(batch)
        before = _rss_bytes()
        resource_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for _ in range(steps):
            step(batch)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"before": before, "peak": peak, "peak_before": resource_peak_before, "param_bytes": param_bytes}))


def memory_overhead(name: str, steps: int, threads: int) -> dict:
    results = {}
    for label, rho in (("plain", 0.0), ("sam", 0.5)):
        # a fixed mmap threshold: every block >= 64 KiB is mmap'ed and returned to the OS when freed,
        # so the RSS follows live tensor memory (glibc's default dynamic threshold keeps freed blocks)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, "--rho", str(rho), "--mem-steps", str(steps),
             "--threads", str(threads)],
            capture_output=True, text=True, check=True, env=env,
        )
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    param_bytes = results["sam"]["param_bytes"]
    plain_extra = results["plain"]["peak"] - results["plain"]["before"]
    sam_extra = results["sam"]["peak"] - results["sam"]["before"]
    return {
        "model": name,
        "param_MB": param_bytes / 2**20,
        "plain_step_peak_MB": plain_extra / 2**20,
        "sam_step_peak_MB": sam_extra / 2**20,
        "sam_minus_plain_in_param_copies": (sam_extra - plain_extra) / param_bytes,
        "analytic_backup_param_copies": 1.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert", "vit"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noisy on a shared CPU)")
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rho", type=float, default=0.5, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    if cli.memory_child:
        memory_child(cli.memory_child, cli.rho, cli.mem_steps)
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, threads={cli.threads}, reps={cli.reps}, load avg={os.getloadavg()}")
    for name in cli.models:
        t = time_ratio(name, cli.reps, cli.warmup)
        print(
            f"[time] {name:4s} {t['params_M']:.2f}M params: plain {t['plain_ms_median']:.1f} ms, "
            f"ASAM {t['sam_ms_median']:.1f} ms; ratio median {t['ratio_median']:.3f}x "
            f"(IQR {t['ratio_q1']:.3f}-{t['ratio_q3']:.3f}, min {t['ratio_min']:.3f}, max {t['ratio_max']:.3f}; "
            f"ratio of medians {t['ratio_of_medians']:.3f}x)"
        )
        ops = time_sharpness_ops(name, cli.reps)
        print(
            f"[ops]  {name:4s} perturbation maths + backup + restore: {ops['ops_ms_median']:.2f} ms "
            f"= {100 * ops['ops_ms_median'] / t['plain_ms_median']:.1f}% of a plain step"
        )
        if not cli.skip_memory:
            m = memory_overhead(name, cli.mem_steps, cli.threads)
            print(
                f"[mem]  {name:4s} params {m['param_MB']:.1f} MB: step peak over baseline plain "
                f"{m['plain_step_peak_MB']:.1f} MB, ASAM {m['sam_step_peak_MB']:.1f} MB -> ASAM extra = "
                f"{m['sam_minus_plain_in_param_copies']:.2f} param copies (analytic: backups = 1.00)"
            )
    print(f"load avg at end={os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
