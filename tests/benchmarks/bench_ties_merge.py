"""Benchmark: streamed exact TIES merge vs the flatten-everything reference, same inputs.

Eight synthetic fine-tuned checkpoints of the CLIP ViT-B/32 image encoder (87.8M parameters
each, real tensor shapes) plus the pretrained one are written as safetensors to a temporary directory.
Then, each in its own subprocess (peak RSS read with resource.getrusage(RUSAGE_CHILDREN) by a
fresh intermediate process, so one run cannot pollute the other's number):

- stream:    saft_hf.merging.merge_models (global trim, exact thresholds by radix select,
             tensor by tensor, sharded safetensors output);
- reference: the TIES paper code's approach: load every checkpoint, flatten into a T x P matrix,
             kthvalue per row, elect signs, disjoint mean, unflatten, save.

Both outputs are compared tensor by tensor. Usage:
    python tests/benchmarks/bench_ties_merge.py            # full size (~3.2 GB temporary disk)
    python tests/benchmarks/bench_ties_merge.py --scale 0.1 # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def clip_vit_b32_shapes(scale: float = 1.0) -> dict[str, tuple]:
    """The CLIP ViT-B/32 image encoder (what task-arithmetic papers merge): 87.8M parameters."""
    blocks = max(1, round(12 * scale))
    width = 768
    shapes = {"visual.class_embedding": (width,), "visual.positional_embedding": (50, width),
              "visual.conv1.weight": (width, 3, 32, 32), "visual.ln_pre.weight": (width,),
              "visual.ln_pre.bias": (width,), "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
              "visual.proj": (width, 512)}
    for b in range(blocks):
        p = f"visual.transformer.resblocks.{b}"
        shapes.update({
            f"{p}.attn.in_proj_weight": (3 * width, width), f"{p}.attn.in_proj_bias": (3 * width,),
            f"{p}.attn.out_proj.weight": (width, width), f"{p}.attn.out_proj.bias": (width,),
            f"{p}.ln_1.weight": (width,), f"{p}.ln_1.bias": (width,),
            f"{p}.mlp.c_fc.weight": (4 * width, width), f"{p}.mlp.c_fc.bias": (4 * width,),
            f"{p}.mlp.c_proj.weight": (width, 4 * width), f"{p}.mlp.c_proj.bias": (width,),
            f"{p}.ln_2.weight": (width,), f"{p}.ln_2.bias": (width,),
        })
    return shapes


def make_checkpoints(directory: Path, num_tasks: int, scale: float) -> int:
    import torch
    from safetensors.torch import save_file

    shapes = clip_vit_b32_shapes(scale)
    g = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(pre, str(directory / "pretrained.safetensors"))
    for t in range(num_tasks):
        ft = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in pre.items()}
        save_file(ft, str(directory / f"task{t}.safetensors"))
        del ft
    return sum(v.numel() for v in pre.values())


# ------------------------------------------------------------------------------ workers
def worker_stream(directory: Path, num_tasks: int, density: float, scaling: float) -> dict:
    from saft_hf.merging import merge_models

    cfg = {"pretrained": str(directory / "pretrained.safetensors"),
           "models": [str(directory / f"task{t}.safetensors") for t in range(num_tasks)],
           "method": "ties", "params": {"scaling": scaling, "density": density}, "max_shard_size": "2GB"}
    t0 = time.perf_counter()
    merge_models(cfg, directory / "out_stream", progress=False)
    return {"seconds": time.perf_counter() - t0}


def worker_reference(directory: Path, num_tasks: int, density: float, scaling: float) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    pre = load_file(str(directory / "pretrained.safetensors"))
    keys = sorted(pre)
    fts = [load_file(str(directory / f"task{t}.safetensors")) for t in range(num_tasks)]
    flat_pre = torch.cat([pre[k].reshape(-1) for k in keys])
    tv = torch.vstack([torch.cat([ft[k].reshape(-1) for k in keys]) for ft in fts]) - flat_pre  # T x P
    del fts
    d = tv.shape[1]
    kth = tv.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    tv = tv * (tv.abs() >= kth)
    elected = torch.sign(tv.sum(0))
    majority = torch.sign(elected.sum())
    elected[elected == 0] = majority if majority != 0 else 1
    keep = torch.where(elected.unsqueeze(0) > 0, tv > 0, tv < 0)
    sel = tv * keep
    merged = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    flat = flat_pre + scaling * merged
    out, i = {}, 0
    for k in keys:
        n = pre[k].numel()
        out[k] = flat[i:i + n].reshape(pre[k].shape).clone()
        i += n
    save_file(out, str(directory / "out_reference.safetensors"))
    return {"seconds": time.perf_counter() - t0}


def measure(args, mode: str) -> dict:
    """Run the worker as a child of this (fresh) process; report its peak RSS via RUSAGE_CHILDREN."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--worker", mode, "--dir", args.dir, "--tasks", str(args.tasks),
           "--density", str(args.density), "--scaling", str(args.scaling)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{res.stderr[-3000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    info["wall_seconds_incl_startup"] = time.perf_counter() - t0
    return info


def compare_outputs(directory: Path) -> float:
    from safetensors import safe_open

    from saft_hf.merging import open_source

    stream = open_source(directory / "out_stream")
    worst = 0.0
    with safe_open(str(directory / "out_reference.safetensors"), "pt") as ref:
        keys = set(ref.keys())
        assert keys == set(stream.keys()), "outputs hold different keys"
        for k in keys:
            worst = max(worst, (ref.get_tensor(k) - stream.get(k)).abs().max().item() if ref.get_tensor(k).numel() else 0.0)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="shrink the model (0.1 = ~1/10 of ViT-B/32)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--scaling", type=float, default=0.3)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["stream", "reference", "measure-stream", "measure-reference", "make"], default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker in ("stream", "reference"):
        fn = worker_stream if args.worker == "stream" else worker_reference
        info = fn(Path(args.dir), args.tasks, args.density, args.scaling)
        info["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(info))
        return
    if args.worker in ("measure-stream", "measure-reference"):
        print(json.dumps(measure(args, args.worker.split("-")[1])))
        return
    if args.worker == "make":
        print(json.dumps({"params": make_checkpoints(Path(args.dir), args.tasks, args.scale)}))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_ties_"))
    try:
        args.dir = str(tmp)
        t0 = time.perf_counter()
        made = subprocess.run([sys.executable, __file__, "--worker", "make", "--dir", str(tmp), "--tasks", str(args.tasks),
                               "--scale", str(args.scale)], capture_output=True, text=True, check=True)
        params = json.loads(made.stdout.strip().splitlines()[-1])["params"]
        size_mb = sum(f.stat().st_size for f in tmp.glob("*.safetensors")) / 1e6
        print(f"wrote {args.tasks}+1 checkpoints of {params / 1e6:.1f}M params ({size_mb:.0f} MB) in {time.perf_counter() - t0:.0f}s")
        results = {}
        for mode in ("stream", "reference"):
            # each measurement in a fresh intermediate process: RUSAGE_CHILDREN then covers only its worker
            r = subprocess.run([sys.executable, __file__, "--worker", f"measure-{mode}", "--dir", str(tmp),
                                "--tasks", str(args.tasks), "--density", str(args.density), "--scaling", str(args.scaling)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-3000:])
            results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{mode:>9}: peak RSS {results[mode]['peak_rss_mb']:8.0f} MB   merge time {results[mode]['seconds']:7.1f} s")
        diff = compare_outputs(tmp)
        s, f = results["stream"], results["reference"]
        summary = {"params_per_model": params, "tasks": args.tasks, "density": args.density, "scale": args.scale,
                   "stream": s, "reference": f, "memory_ratio": f["peak_rss_mb"] / s["peak_rss_mb"],
                   "speed_ratio": f["seconds"] / s["seconds"], "max_abs_diff": diff}
        print(f"memory: reference / stream = {summary['memory_ratio']:.2f}x   time: reference / stream = "
              f"{summary['speed_ratio']:.2f}x   max |stream - reference| = {diff:.3g}")
        print(json.dumps(summary))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
