"""Cost of one step of every SAM variant relative to one plain step, same model and batch (a script, not a test).

    python tests/benchmarks/bench_sam_step.py [--reps 30] [--threads 1] [--models bert vit] [--variants ...]
                                              [--batch-size 8]

Time: `SAFTTrainer.training_step` + `optimizer.step()` + `zero_grad()` (+ the global step counter, so
`sam_interval` and LookSAM alternate as in training), one trainer per variant on its own copy of the model,
all variants interleaved (the order rotates every repetition) after warm-up. Each repetition times a block
of `--block` consecutive optimizer steps per variant (5 = one cycle of SAM-every-5 and LookSAM k=5), and
the ratio is block time / plain block time; reports the median of the per-repetition ratios and its
interquartile range (the CPU is shared, so look at the spread).

Memory: each variant runs `--mem-steps` steps in a fresh subprocess with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor block of 64 KiB or more is mmap'ed and
returned to the OS when freed and the resident set size follows live tensor memory. The peak RSS
(ru_maxrss) minus the RSS between steps (weights, optimizer state, a variant's kept state) is that
variant's per-step peak working memory; the difference variant - plain, in units of "one copy of the
trainable parameters", is what the variant costs on top of plain training during a step ("step extra");
"kept" is the difference of the RSS between steps (state a variant keeps across steps, e.g. LookSAM's
direction). Small tensors below 64 KiB are not tracked precisely: a few MB of noise. Analytic answer for
ASAM: the backups are one copy; the first-pass gradients (which become e) are freed right after w += e.
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


def build(name: str, scale: str, batch_size: int = 8):
    """A model from a config and a fixed batch of `batch_size` examples for it (8: the issue's measurement;
    larger batches show how the per-parameter work of a variant shrinks relative to a step)."""
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
        ids = torch.randint(1, 1000, (batch_size, 64))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, 4, (batch_size,))}
    elif name == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        hidden = 256 if big else 128
        config = ViTConfig(
            image_size=64, patch_size=8, num_channels=3, hidden_size=hidden, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=4 * hidden, num_labels=10,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        model = ViTForImageClassification(config)
        batch = {"pixel_values": torch.randn(batch_size, 3, 64, 64), "labels": torch.randint(0, 10, (batch_size,))}
    else:
        raise ValueError(f"unknown model {name!r}: use bert or vit")
    return model, batch


# name -> SAFTTrainingArguments knobs (plain = sam_rho 0: exactly Trainer)
VARIANTS = {
    "plain": dict(sam_rho=0.0),
    "asam": dict(sam_variant="asam", sam_rho=0.5),
    "asam-interval5": dict(sam_variant="asam", sam_rho=0.5, sam_interval=5),
    "looksam-k5": dict(sam_variant="looksam", sam_rho=0.05, sam_looksam_k=5),
    "gsam": dict(sam_variant="gsam", sam_rho=0.05),
    "rwp": dict(sam_variant="rwp", sam_rho=1.0),
    "esam": dict(sam_variant="esam", sam_rho=0.05),
    "fsam": dict(sam_variant="fsam", sam_rho=0.1),
}
TARGETS = {"asam-interval5": 1.3, "looksam-k5": 1.3, "rwp": 1.1, "esam": 1.6, "gsam": 2.1, "fsam": 2.1}


def make_trainer(model, variant: str, workdir: str, batch_size: int = 8):
    from saft_hf import SAFTTrainer, SAFTTrainingArguments

    args = SAFTTrainingArguments(
        output_dir=workdir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=batch_size, **VARIANTS[variant],
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trainer = SAFTTrainer(model=model, args=args, optimizers=(optimizer, None))
    trainer.current_gradient_accumulation_steps = 1

    def step(batch):
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1  # what Trainer's loop does: sam_interval / LookSAM follow it

    return step


def time_ratios(name: str, variants: list[str], reps: int, warmup: int, block: int, batch_size: int = 8) -> dict:
    model, batch = build(name, "time", batch_size)
    with tempfile.TemporaryDirectory() as workdir:
        steps = {v: make_trainer(copy.deepcopy(model), v, workdir, batch_size) for v in variants}
        for _ in range(warmup):
            for v in variants:
                for _ in range(block):
                    steps[v](batch)
        times = {v: [] for v in variants}
        for rep in range(reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                start = time.perf_counter()
                for _ in range(block):
                    steps[v](batch)
                times[v].append((time.perf_counter() - start) / block)
    results = {}
    for v in variants:
        ratios = [t / p for t, p in zip(times[v], times["plain"])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[v] = {
            "ms_median": 1e3 * statistics.median(times[v]),
            "ratio_median": statistics.median(ratios),
            "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[2],
        }
    results["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    return results


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


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """VmHWM (peak RSS since the last reset), or ru_maxrss (since the start) where VmHWM is missing."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(name: str, variant: str, steps: int) -> None:
    """Runs in a subprocess: prints {"before": rss, "peak": peak rss during the steps, ...} as JSON."""
    model, batch = build(name, "mem")
    with tempfile.TemporaryDirectory() as workdir:
        step = make_trainer(model, variant, workdir)
        # the optimizer state (and a variant's kept state) exists before measuring
        step(batch)
        # imports and model construction can peak higher than a step: measure the peak from here on
        _reset_peak_rss()
        before = _rss_bytes()
        for _ in range(steps):
            step(batch)
        peak = _peak_rss_bytes()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"before": before, "peak": peak, "param_bytes": param_bytes}))


def memory_overhead(name: str, variants: list[str], steps: int, threads: int) -> dict:
    results = {}
    for variant in variants:
        # a fixed mmap threshold: every block >= 64 KiB is mmap'ed and returned to the OS when freed,
        # so the RSS follows live tensor memory (glibc's default dynamic threshold keeps freed blocks)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, "--variant", variant, "--mem-steps", str(steps),
             "--threads", str(threads)],
            capture_output=True, text=True, check=True, env=env,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    param_bytes = results["plain"]["param_bytes"]
    plain = results["plain"]
    summary = {"param_MB": param_bytes / 2**20}
    for variant, r in results.items():
        summary[variant] = {
            "step_extra_copies": ((r["peak"] - r["before"]) - (plain["peak"] - plain["before"])) / param_bytes,
            "kept_copies": (r["before"] - plain["before"]) / param_bytes,
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert", "vit"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up blocks per variant")
    parser.add_argument("--block", type=int, default=5, help="optimizer steps timed together per variant and rep")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noisy on a shared CPU)")
    parser.add_argument("--mem-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="examples per step for the time measurement (default 8, x 64 tokens for BERT)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true", help="memory only")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="asam", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    if cli.memory_child:
        memory_child(cli.memory_child, cli.variant, cli.mem_steps)
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    variants = ["plain"] + [v for v in cli.variants if v != "plain"]
    print(f"torch {torch.__version__}, threads={cli.threads}, reps={cli.reps}, block={cli.block}, "
          f"batch size {cli.batch_size} (time), "
          f"load avg={os.getloadavg()}")
    for name in cli.models:
        t = (time_ratios(name, variants, cli.reps, cli.warmup, cli.block, cli.batch_size) if not cli.skip_time else
             {v: {"ms_median": float("nan"), "ratio_median": float("nan"), "ratio_q1": float("nan"),
                  "ratio_q3": float("nan")} for v in variants} | {"params_M": float("nan")})
        m = None if cli.skip_memory else memory_overhead(name, variants, cli.mem_steps, cli.threads)
        print(f"\n{name}: {t['params_M']:.2f}M params (time); "
              + ("" if m is None else f"{m['param_MB']:.1f} MB trainable params (memory model)"))
        print(f"| variant | ms/step (median) | x plain (median) | IQR | target | step extra (param copies) | kept |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for v in variants:
            r = t[v]
            mem = ("- | -" if m is None else
                   f"{m[v]['step_extra_copies']:.2f} | {m[v]['kept_copies']:.2f}")
            target = f"<= {TARGETS[v]}" if v in TARGETS else "-"
            print(f"| {v} | {r['ms_median']:.1f} | {r['ratio_median']:.3f} | {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} "
                  f"| {target} | {mem} |")
        if "asam" in variants and not cli.skip_time:
            ops = time_sharpness_ops(name, cli.reps)
            print(f"[ops] {name}: ASAM perturbation maths + backup + restore: {ops['ops_ms_median']:.2f} ms "
                  f"= {100 * ops['ops_ms_median'] / t['plain']['ms_median']:.1f}% of a plain step")
    print(f"load avg at end={os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
