"""Cost of the merge methods that read data (a script, not a test), beside task arithmetic.

    python tests/benchmarks/bench_data_merges.py [--tasks 4] [--hidden 64] [--layers 2] [--examples 64]
        [--seq 32] [--steps 20] [--threads 1]

A BertModel built from a BertConfig (random weights; T perturbed copies as the fine-tuned
models, saved as safetensors checkpoints), T tasks of random token ids with a fixed random
3-class head on [CLS]. Reports wall seconds of: task arithmetic (streamed, from disk); RegMean
and Fisher merging (exact and sampled) the first time (statistics computed and cached beside the
checkpoints) and the second time (read from the cache); AdaMerging task- and layer-wise for
--steps steps; and the size of the cached statistics.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from saft_hf import merging
from saft_hf.merging import MergeData


class RandomTokens(MergeData):
    def __init__(self, config, tasks, examples, seq, batch=16, fingerprint="bench-v1"):
        g = torch.Generator().manual_seed(0)
        self.config, self.tasks, self.batch, self._fp = config, list(tasks), batch, fingerprint
        self.ids = {t: torch.randint(1, config.vocab_size, (examples, seq), generator=g) for t in self.tasks}
        self.heads = {t: torch.randn(3, config.hidden_size, generator=g) for t in self.tasks}

    def model(self, state_dict):
        from transformers import BertModel

        m = BertModel(self.config, add_pooling_layer=False)
        m.load_state_dict(state_dict)
        return m.eval()

    def batches(self, task, split):
        ids = self.ids[task]
        for i in range(0, len(ids), self.batch):
            yield {"input_ids": ids[i:i + self.batch]}

    def logits(self, model, batch, task):
        return model(**batch).last_hidden_state[:, 0] @ self.heads[task].T

    def fingerprint(self, task, split):
        return self._fp


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)  # 2 threads on a loaded 2-core machine: 50x slower
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=4 * args.hidden, max_position_embeddings=args.seq)
    names = [f"task{i}" for i in range(args.tasks)]
    module = __name__ if __name__ != "__main__" else "bench_data_merges"
    sys.modules.setdefault(module, sys.modules[__name__])
    global _DATA
    _DATA = RandomTokens(config, names, args.examples, args.seq)
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        theta0 = {k: v.contiguous() for k, v in BertModel(config, add_pooling_layer=False).state_dict().items()}
        save_file(theta0, str(tmp / "base.safetensors"))
        g = torch.Generator().manual_seed(1)
        for n in names:
            (tmp / n).mkdir()
            save_file({k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() for k, v in theta0.items()},
                      str(tmp / n / "model.safetensors"))
        results["parameters"] = sum(v.numel() for v in theta0.values())

        def run(label, method, params):
            cfg = {"pretrained": str(tmp / "base.safetensors"), "method": method, "params": params,
                   "models": [{"name": n, "path": str(tmp / n)} for n in names]}
            if method != "task_arithmetic":
                cfg["data"] = f"{module}:make_data"
            t0 = time.perf_counter()
            merging.merge_models(cfg, tmp / "out" / label, progress=False)
            results[label] = round(time.perf_counter() - t0, 3)
            print(f"{label}: {results[label]:.2f} s", flush=True)

        run("task_arithmetic", "task_arithmetic", {"scaling": 0.3})
        run("regmean_first", "regmean", {"examples": args.examples})
        run("regmean_cached", "regmean", {"examples": args.examples, "alpha": 0.5})
        run("fisher_exact_first", "fisher_merging", {"examples": args.examples})
        run("fisher_exact_cached", "fisher_merging", {"examples": args.examples, "epsilon": 1e-5})
        run("fisher_sample_first", "fisher_merging", {"examples": args.examples, "estimator": "sample"})
        run("adamerging_task", "adamerging", {"granularity": "task", "steps": args.steps, "split": "train"})
        run("adamerging_layer", "adamerging", {"granularity": "layer", "steps": args.steps, "split": "train"})
        stats = list((tmp / names[0] / ".saft_merge_stats").glob("*.safetensors"))
        results["cache_bytes_task0"] = {f.name: f.stat().st_size for f in sorted(stats)}
    print(json.dumps(results, indent=2))
    return results


_DATA = None


def make_data():
    return _DATA


if __name__ == "__main__":
    main()
