"""Benchmark: the same mergekit YAML run by mergekit 0.1.5 and by `saft-hf merge`.

A Llama-shaped base model (safetensors, float32; default ~57M parameters) and three fine-tuned
copies (random deltas) are written to a temporary directory. For each method (ties with
per-model weights/densities, task_arithmetic) each tool runs in its own subprocess; wall time
and peak RSS (ru_maxrss of that child) are printed, and the outputs are compared tensor by
tensor (max |diff|, number of tensors not bit-equal).

    python tests/benchmarks/bench_mergekit_compare.py              # ~1 GB temporary disk
    python tests/benchmarks/bench_mergekit_compare.py --hidden 256 # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, json, yaml
tool, cfg_path, out = sys.argv[1:4]
cfg = yaml.safe_load(open(cfg_path))
if tool == "mergekit":
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    run_merge(MergeConfiguration.model_validate(cfg), out,
              MergeOptions(lazy_unpickle=False, copy_tokenizer=False, quiet=True, write_model_card=False))
else:
    from saft_hf.merging import merge_models
    merge_models(cfg_path, out, progress=False)
"""


def build(root: Path, hidden: int, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    sd0 = base.state_dict()
    n = sum(v.numel() for v in sd0.values())
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        base.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd0.items()})
        base.save_pretrained(root / f"ft{i}")
        base.load_state_dict(sd0)
    return {"params": n}


def run(tool: str, cfg_path: Path, out: Path) -> dict:
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]], check=True); "
             "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", probe, CHILD, tool, str(cfg_path), str(out)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    secs, rss_kb = res.stdout.split()[-2:]
    return {"seconds": round(float(secs), 2), "peak_rss_mb": round(int(rss_kb) / 1024)}


def compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = load(a), load(b)
    assert set(x) == set(y)
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    worst = max((x[k].double() - y[k].double()).abs().max().item() for k in x)
    return {"tensors": len(x), "not_bit_equal": len(differ), "max_abs_diff": worst}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = build(root, args.hidden, args.layers)
        print(f"{info['params'] / 1e6:.1f}M parameters per model, base + 3 fine-tuned (float32)")
        models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": w, "density": d}}
                  for i, (w, d) in enumerate([(1.0, 0.5), (0.5, 0.3), (0.7, 0.9)])]
        for method in ("ties", "task_arithmetic"):
            cfg = {"merge_method": method, "base_model": str(root / "base"), "models": models, "dtype": "float32"}
            cfg_path = root / f"{method}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            row = {"method": method}
            for tool in ("mergekit", "saft"):
                row[tool] = run(tool, cfg_path, root / f"{tool}_{method}")
                time.sleep(1)
            row["outputs"] = compare(root / f"mergekit_{method}", root / f"saft_{method}")
            print(json.dumps(row))


if __name__ == "__main__":
    main()
