"""Benchmark: the SVD merge methods (TSV-M, Iso-C, Iso-CTS) beside task arithmetic, same inputs.

Eight synthetic fine-tuned checkpoints of the CLIP ViT-B/32 image encoder (87.8M parameters
each, the real tensor shapes; fine-tuning deltas of i.i.d. noise, so every task matrix is full
rank) plus the pretrained one are written as safetensors to a temporary directory (the same
generator as bench_ties_merge.py). Each method then runs `saft_hf.merging.merge_models` (the
`saft-hf merge` path: streamed tensor by tensor, sharded output) in its own subprocess; peak RSS
is read with resource.getrusage(RUSAGE_CHILDREN) by a fresh intermediate process, so one run
cannot pollute another's number.

Memory to expect: the SVD methods need each whole matrix of every task at once (T x the largest
matrix: 8 x 3072 x 768 float32 = 75 MB) plus the SVD work space and the output buffer - not all
models at once (9 x 351 MB = 3.2 GB). `--check` also merges in memory (all models loaded) and
compares the outputs bit for bit (use a small --scale).

    python tests/benchmarks/bench_svd_merge.py                 # full size, 8 tasks (~3.2 GB temp disk)
    python tests/benchmarks/bench_svd_merge.py --scale 0.25    # 3 of the 12 blocks
    python tests/benchmarks/bench_svd_merge.py --scale 0.1 --tasks 3 --check
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("task_arithmetic", "tsv_merging", "iso_c", "iso_cts")
PARAMS = {"task_arithmetic": {"scaling": 0.3}, "tsv_merging": {"scaling": 1.0}, "iso_c": {"scaling": 1.3},
          "iso_cts": {"scaling": 1.5, "common_space_fraction": 0.8}}


def _ties_bench():
    spec = importlib.util.spec_from_file_location("bench_ties_merge", Path(__file__).with_name("bench_ties_merge.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config(directory: Path, num_tasks: int, method: str) -> dict:
    return {"pretrained": str(directory / "pretrained.safetensors"),
            "models": [str(directory / f"task{t}.safetensors") for t in range(num_tasks)],
            "method": method, "params": PARAMS[method], "max_shard_size": "2GB"}


def worker(directory: Path, num_tasks: int, method: str) -> dict:
    from saft_hf.merging import merge_models

    t0, c0 = time.perf_counter(), time.process_time()
    merge_models(config(directory, num_tasks, method), directory / f"out_{method}", progress=False)
    # CPU seconds too: on a shared, loaded machine wall time mostly measures the other jobs
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def measure(directory: str, num_tasks: int, method: str) -> dict:
    """Run the worker as a child of this (fresh) process; its peak RSS via RUSAGE_CHILDREN."""
    cmd = [sys.executable, __file__, "--worker", "run", "--dir", directory, "--tasks", str(num_tasks), "--method", method]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{res.stderr[-3000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return info


def check_in_memory(directory: Path, num_tasks: int, methods) -> dict:
    """Max |on-disk - in-memory| per method (0.0 = bit for bit)."""
    from safetensors.torch import load_file

    from saft_hf.merging import merge, open_source

    pre = load_file(str(directory / "pretrained.safetensors"))
    tvs = []
    for t in range(num_tasks):
        ft = load_file(str(directory / f"task{t}.safetensors"))
        tvs.append({k: ft[k] - pre[k] for k in pre})
    out = {}
    for method in methods:
        mem = merge(method, pre, tvs, **PARAMS[method])
        disk = open_source(directory / f"out_{method}")
        out[method] = max(float((disk.get(k) - mem[k]).abs().max()) for k in pre)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the 12 transformer blocks (0.25 = 3)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--check", action="store_true", help="also compare with the in-memory merge (loads all models)")
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["run", "measure"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "run":
        info = worker(Path(args.dir), args.tasks, args.method)
        info["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(info))
        return
    if args.worker == "measure":
        print(json.dumps(measure(args.dir, args.tasks, args.method)))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    shapes = _ties_bench().clip_vit_b32_shapes(args.scale)
    largest = max((s for s in shapes.values() if len(s) == 2), key=lambda s: s[0] * s[1])
    tmp = Path(tempfile.mkdtemp(prefix="bench_svd_"))
    try:
        t0 = time.perf_counter()
        make = ("import sys, json; sys.path.insert(0, %r); import bench_ties_merge as b; from pathlib import Path; "
                "print(json.dumps(b.make_checkpoints(Path(%r), %d, %r)))") % (str(Path(__file__).parent), str(tmp),
                                                                               args.tasks, args.scale)
        made = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True, check=True)
        params = json.loads(made.stdout.strip().splitlines()[-1])
        model_mb = params * 4 / 1e6
        print(f"wrote {args.tasks}+1 checkpoints of {params / 1e6:.1f}M params ({model_mb:.0f} MB each) "
              f"in {time.perf_counter() - t0:.0f}s; all models at once = {(args.tasks + 1) * model_mb:.0f} MB; "
              f"largest matrix {list(largest)} x {args.tasks} tasks = {args.tasks * largest[0] * largest[1] * 4 / 1e6:.0f} MB")
        results = {}
        for method in methods:
            # each measurement in a fresh intermediate process: RUSAGE_CHILDREN covers only its worker
            r = subprocess.run([sys.executable, __file__, "--worker", "measure", "--dir", str(tmp), "--tasks",
                                str(args.tasks), "--method", method], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-3000:])
            results[method] = json.loads(r.stdout.strip().splitlines()[-1])
            cpu = results[method].get("cpu_seconds")
            print(f"{method:>16}: peak RSS {results[method]['peak_rss_mb']:7.0f} MB   merge time "
                  f"{results[method]['seconds']:7.1f} s" + (f" (CPU {cpu:.1f} s)" if cpu is not None else ""), flush=True)
        summary = {"params_per_model": params, "tasks": args.tasks, "scale": args.scale, "model_mb": model_mb,
                   "all_models_mb": (args.tasks + 1) * model_mb, "largest_matrix": list(largest), "results": results}
        if args.check:
            summary["max_abs_diff_vs_in_memory"] = check_in_memory(tmp, args.tasks, methods)
            print("max |on-disk - in-memory|:", summary["max_abs_diff_vs_in_memory"])
        print(json.dumps(summary))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
