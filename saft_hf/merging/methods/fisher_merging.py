"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted
Averaging"): every entry is the Fisher-weighted average of the models,

    theta = sum_i c_i F_i theta_i / sum_i c_i F_i,

with F_i the diagonal Fisher of model i on its task's inputs. As in the paper's code
(mmatena/model_merging): the Fisher is the true (not empirical) one, the expectation over the
model's own predictive distribution, per example: F = 1/N sum_n sum_y p(y|x_n) (d log p(y|x_n) /
d theta)^2 (`estimator: exact`; `sample` draws one label per example from p(y|x_n) instead,
an unbiased estimate at 1/C of the cost); Fisher values are floored at `epsilon` (1e-6) so
entries no example reaches fall back to the plain average; and c_i = w_i / ||F_i|| (the whole
model's L2 norm, `normalize: true`) so a task with a larger Fisher does not dominate.
Labels are never read. Tensors that are not parameters of the model (buffers) get F = 0, i.e.
the (weighted) average.

Computed on deltas from any reference theta_0 (pretrained or the first model): theta_0 cancels
since the weights sum to one.
"""
from __future__ import annotations

import math

import torch

from ..data import SPLITS, module_key_map
from ..engine import per_task
from ..registry import MergeMethod, Param, ParamError, register_method

ESTIMATORS = ("exact", "sample")


def fisher_statistics(model, task: str, data, plan, examples: int, split: str, estimator: str,
                      seed: int) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of `model` on the first `examples` examples of the task, per merged key."""
    keymap = module_key_map(model, data, plan.keys, plan.aliases, buffers=False)
    params = [(name, p) for name, p in model.named_parameters() if name in keymap]  # tied: listed once
    if not params:
        raise ValueError("Fisher merging found no parameter of the model that is a merged tensor; check "
                         "MergeData.model / state_key")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    fisher = {keymap[name]: torch.zeros(p.shape, dtype=torch.float32) for name, p in params}
    tensors = [p for _, p in params]
    gen = torch.Generator().manual_seed(seed)
    n = 0

    def add(logp_y, weight):
        grads = torch.autograd.grad(logp_y, tensors, retain_graph=True, allow_unused=True)
        for (name, _), g in zip(params, grads):
            if g is not None:
                fisher[keymap[name]].add_(g.detach().to(torch.float32).square_(), alpha=float(weight))

    for batch in data.batches(task, split):
        for example in data.split_batch(batch):
            if n >= examples:
                break
            logits = data.logits(model, example, task)
            if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 2:
                raise ValueError(f"Fisher merging needs classification logits of shape [1, C>=2] per example; "
                                 f"got {tuple(logits.shape)} for task {task!r}")
            logp = torch.log_softmax(logits[0].to(torch.float32), -1)
            probs = logp.detach().exp()
            if estimator == "exact":
                for y in range(probs.numel()):
                    add(logp[y], probs[y])
            else:
                y = int(torch.multinomial(probs, 1, generator=gen))
                add(logp[y], 1.0)
            n += 1
        if n >= examples:
            break
    for p in model.parameters():
        p.requires_grad_(False)
    if n == 0:
        raise ValueError(f"Fisher merging: the data gave no {split} examples for task {task!r}")
    out = {f"fisher:{k}": f.div_(n) for k, f in fisher.items()}
    out["examples"] = torch.tensor(n, dtype=torch.int64)
    return out


def collect(model, task, data, ctx):
    p = ctx.params
    return fisher_statistics(model, task, data, ctx.plan, p["examples"], p["split"], p["estimator"], p["seed"])


def check(params: dict, num_tasks: int | None) -> None:
    w = params.get("weights")
    if w is not None and sum(w if isinstance(w, list) else [w]) <= 0:
        raise ParamError("fisher_merging weights must have a positive sum")


def prepass(ctx) -> None:
    weights = per_task(ctx.params.get("weights", 1.0), ctx.num_tasks, "weights")
    norms = [1.0] * ctx.num_tasks
    if ctx.params["normalize"]:
        for t, stats in enumerate(ctx.stats):
            sq = sum(float(stats.get(n).to(torch.float64).square().sum()) for n in stats.names() if n.startswith("fisher:"))
            norms[t] = math.sqrt(sq) if sq > 0 else 1.0  # an all-zero Fisher: the floor decides anyway
    ctx.state["coeffs"] = [w / n for w, n in zip(weights, norms)]
    ctx.report["fisher"] = {"fisher_norms": norms, "coefficients": ctx.state["coeffs"],
                            "examples": [int(s.get("examples")) for s in ctx.stats]}


def kernel(deltas, ctx):
    eps = ctx.params["epsilon"]
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for t, stats in enumerate(ctx.stats):
        f = stats.get(f"fisher:{ctx.key}")
        if f is None:
            f = torch.zeros_like(deltas[t])
        elif ctx.rows is not None:
            f = f[ctx.rows[0]:ctx.rows[1]]
        w = f.to(deltas.dtype).clamp(min=eps).mul_(ctx.state["coeffs"][t])
        den.add_(w)
        num.add_(w.mul_(deltas[t]))
    return num.div_(den)


register_method(MergeMethod(
    name="fisher_merging",
    description="Fisher merging: per-entry average weighted by each model's diagonal Fisher on its task's "
                "inputs (Matena & Raffel 2022); reads data",
    params=[
        Param("weights", "per_task_float", None, "model weights w_i (omit for uniform)", low=0.0),
        Param("epsilon", "float", 1e-6, "floor of the Fisher values (paper code's fisher_floor)", low=0.0,
              low_open=True),
        Param("normalize", "bool", True, "divide each model's weight by its Fisher's L2 norm (paper code)"),
        Param("examples", "int", 256, "examples per task for the Fisher (paper code: 4096; FusionBench CLIP: 256)",
              low=1),
        Param("estimator", "choice", "exact", "exact: expectation over all classes (paper); sample: one label "
              "drawn from the model per example (C times cheaper)", choices=ESTIMATORS),
        Param("seed", "int", 0, "random seed of estimator: sample"),
        Param("split", "choice", "train", "which inputs of each task (paper: training data)", choices=SPLITS),
    ],
    kernel=kernel,
    prepass=prepass,
    check=check,
    label="Fisher merging",
    short_label="Fisher",
    needs_pretrained=False,
    takes_task_vectors=False,
    needs_data=True,
    collect=collect,
    data_params=("examples", "estimator", "seed", "split"),
    order=61,
))
