"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): each linear layer is merged as the solution of the regression problem
min_W sum_i ||X_i W^T - X_i W_i^T||^2 over the layers' inputs X_i of every task,

    W^T = (sum_i G_i)^-1 sum_i G_i W_i^T,   G_i = X_i^T X_i / n_i,

with the off-diagonal entries of each G_i multiplied by alpha (paper: 0.9); every other tensor
(biases, embeddings, norms) is averaged. As in both reference implementations (the paper's code
and FusionBench), G_i is the mean over all input rows (every token, padding included) of the
task's first `examples` examples, so tasks weigh equally whatever their sequence lengths.

Solved on deltas from any reference model theta_0 (the pretrained one, or the first model):
W = W_bar + (sum_i G_i)^+ sum_i G_i (W_i - W_bar) is the same solution (sum_i G_i W_bar cancels),
computed in float64 by a Cholesky solve when sum_i G_i is positive definite. The paper code
calls torch.inverse, which fails (or returns garbage) when it is singular (inputs that are
always zero, fewer rows than features with alpha = 1); here the pseudo-inverse is used then,
which keeps the average of the models in the directions no input reaches, and the layers where
that happened are listed in the merge report.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import SPLITS, module_key_map
from ..registry import MergeMethod, Param, register_method

LINEAR, CONV1D = 0, 1  # weight layouts: nn.Linear (out, in), HF Conv1D (in, out)


def _layout(module) -> int | None:
    if isinstance(module, nn.Linear):
        return LINEAR
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        return CONV1D
    return None


def linear_layers(model: nn.Module, data, plan) -> dict[str, tuple[nn.Module, str, int]]:
    """{module name: (module, merged weight key, layout)} for the linear layers whose weight is a
    merged tensor not tied to another one (a tied weight, e.g. an LM head sharing the embedding,
    is averaged like the reference implementations do)."""
    keymap = module_key_map(model, data, plan.keys, plan.aliases, buffers=False)
    tied = set(plan.aliases) | set(plan.aliases.values())
    out = {}
    for name, module in model.named_modules():
        layout = _layout(module)
        wname = f"{name}.weight" if name else "weight"
        if layout is None or wname not in keymap or data.state_key(wname) in tied:
            continue
        out[name] = (module, keymap[wname], layout)
    return out


def gram_statistics(model: nn.Module, task: str, data, plan, examples: int, split: str) -> dict[str, torch.Tensor]:
    """Sum of x x^T over the input rows x of every linear layer, and the row counts, on the first
    `examples` examples of the task (whole batches, like the reference code)."""
    layers = linear_layers(model, data, plan)
    if not layers:
        raise ValueError("RegMean found no nn.Linear (or Conv1D) layer whose weight is a merged tensor in the model "
                         "the data built; check MergeData.model / state_key")
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(key):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            g = x.T @ x
            grams[key] = g if key not in grams else grams[key].add_(g)
            rows[key] = rows.get(key, 0) + x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(key)) for m, key, _ in layers.values()]
    seen = 0
    try:
        with torch.no_grad():
            for batch in data.batches(task, split):
                if seen >= examples:
                    break
                seen += int(data.logits(model, batch, task).shape[0])
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError(f"RegMean: the data gave no {split} batches for task {task!r}")
    out: dict[str, torch.Tensor] = {"examples": torch.tensor(seen, dtype=torch.int64)}
    for _, key, layout in layers.values():
        if key in grams:  # a layer the forward never reached is averaged
            out[f"gram:{key}"] = grams[key]
            out[f"rows:{key}"] = torch.tensor(rows[key], dtype=torch.int64)
            out[f"layout:{key}"] = torch.tensor(layout, dtype=torch.int64)
    return out


def collect(model, task, data, ctx):
    return gram_statistics(model, task, data, ctx.plan, ctx.params["examples"], ctx.params["split"])


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G with the diagonal kept: alpha G + (1 - alpha) diag(G)."""
    if alpha == 1.0:
        return gram
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def _solver(grams: list[torch.Tensor], ctx):
    """x -> (sum_i G_i)^-1 x (Cholesky), or the pseudo-inverse when the sum is singular."""
    total = sum(grams)
    chol, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0:
        return lambda rhs: torch.cholesky_solve(rhs, chol)
    ctx.state["pinv"].append(ctx.key)
    pinv = torch.linalg.pinv(total, hermitian=True)
    return lambda rhs: pinv @ rhs


def _key_grams(ctx):
    """Per task G_i (float64, mean over rows, off-diagonals scaled), and the solver, per tensor."""
    if "grams" not in ctx.key_state:
        raw = [s.get(f"gram:{ctx.key}") for s in ctx.stats]
        if any(g is None for g in raw):
            ctx.key_state["grams"] = None
        else:
            grams = [reduce_off_diagonal(g.to(torch.float64) / float(s.get(f"rows:{ctx.key}")), ctx.params["alpha"])
                     for g, s in zip(raw, ctx.stats)]
            ctx.key_state.update(grams=grams, solve=_solver(grams, ctx),
                                 layout=int(ctx.stats[0].get(f"layout:{ctx.key}")))
    return ctx.key_state["grams"]


def regmean_delta(deltas: torch.Tensor, grams: list[torch.Tensor], solve, layout: int) -> torch.Tensor:
    """mean + (sum_i G_i)^+ sum_i G_i (delta_i - mean), in the weight's layout (float64 inside)."""
    d = deltas.to(torch.float64)
    mean = d.mean(0)
    if layout == LINEAR:  # rows are output units: W^T = ..., i.e. W = mean + (sum_i (d_i - mean) G_i) S^-1
        rhs = sum((d[i] - mean) @ g for i, g in enumerate(grams))
        merged = mean + solve(rhs.T.contiguous()).T
    else:  # Conv1D (in, out): W = mean + S^-1 sum_i G_i (d_i - mean)
        rhs = sum(g @ (d[i] - mean) for i, g in enumerate(grams))
        merged = mean + solve(rhs)
    return merged.to(deltas.dtype)


def prepass(ctx) -> None:
    ctx.state.update(pinv=[], regression=0, averaged=0)


def kernel(deltas, ctx):
    grams = _key_grams(ctx)
    if grams is None:
        ctx.state["averaged"] += ctx.rows is None or ctx.rows[0] == 0
        return deltas.mean(0)
    ctx.state["regression"] += ctx.rows is None or ctx.rows[0] == 0
    if ctx.key_state["layout"] == CONV1D and ctx.rows is not None:
        # rows of a Conv1D weight are input features, coupled by the solve: merge the whole tensor once
        if "whole" not in ctx.key_state:
            pre = ctx.base.get(ctx.key)
            full = torch.stack([tv.get(ctx.key, pre) for tv in ctx.tasks])
            ctx.key_state["whole"] = regmean_delta(full, grams, ctx.key_state["solve"], CONV1D)
        return ctx.key_state["whole"][ctx.rows[0]:ctx.rows[1]].clone()
    return regmean_delta(deltas, grams, ctx.key_state["solve"], ctx.key_state["layout"])


def after_pass(ctx) -> None:
    ctx.report["regmean"] = {"regression_tensors": int(ctx.state["regression"]),
                             "averaged_tensors": int(ctx.state["averaged"]),
                             "pseudo_inverse_tensors": list(ctx.state["pinv"]),
                             "examples": [int(s.get("examples")) for s in ctx.stats]}


register_method(MergeMethod(
    name="regmean",
    description="RegMean: linear layers by the closed-form merged regression on each task's layer inputs "
                "(Gram matrices), other tensors averaged (Jin et al. 2023); reads data",
    params=[
        Param("alpha", "float", 0.9, "scale of the off-diagonal Gram entries (1: exact regression; paper 0.9)",
              low=0.0, high=1.0, symbol="alpha"),
        Param("examples", "int", 256, "examples per task for the Gram matrices (paper configs: "
              "gram_n_example 1000; FusionBench CLIP: 256)", low=1),
        Param("split", "choice", "train", "which inputs of each task (paper: training data)", choices=SPLITS),
    ],
    kernel=kernel,
    prepass=prepass,
    after_pass=after_pass,
    label="RegMean",
    short_label="RegMean",
    needs_pretrained=False,
    takes_task_vectors=False,
    needs_data=True,
    collect=collect,
    data_params=("examples", "split"),
    order=60,
))
