"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning"): the merging coefficients of task arithmetic are learned by minimising the entropy of
the merged model's predictions on each task's unlabeled test inputs,

    theta(lambda) = theta_0 + sum_t lambda_t tau_t            (task-wise: one lambda per task)
    theta(lambda)[k] = theta_0[k] + sum_t lambda_{k,t} tau_t[k]  (layer-wise: one per task and tensor k)
    min_lambda  sum_tasks mean_x H(softmax(f(x; theta(lambda)))).

As in the paper's code (EnnengYang/AdaMerging): lambda starts at 0.3, is clamped to [0, 1] in
the forward pass, and is trained with Adam (lr 1e-3, betas 0.9/0.999) for 500 steps, each step
summing the mean entropy of two batches of every task; layer-wise has one coefficient per task
and parameter tensor. `base: ties` is AdaMerging++: the task vectors are first trimmed to their
top-`density` magnitudes and cut to the entries agreeing with the elected sign (TIES, paper K=20),
then combined with the learned coefficients (a sum, like the paper's `dis-sum`).

The merged model is never copied: each step computes theta(lambda) as tensors and calls the one
pretrained module with them (torch.func.functional_call), so gradients reach lambda. All task
vectors are held in memory (T x model size), as in the paper's code. The learned coefficients
and the entropy of every step are in the merge report.
"""
from __future__ import annotations

import torch

from ..data import SPLITS, module_key_map
from ..registry import MergeMethod, Param, register_method
from .ties import ties_thresholds

GRANULARITIES = ("task", "layer")
BASES = ("task_arithmetic", "ties")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def ties_split(stacks: dict[str, torch.Tensor], thresholds: list) -> None:
    """In place: trim each task's entries below its threshold, then keep only the entries whose
    sign agrees with the elected sign (sign of the sum; 0 -> the model-wide majority sign)."""
    total = 0.0
    for s in stacks.values():
        thr = torch.tensor([-1.0 if t is None else t for t in thresholds], dtype=s.dtype)
        s.mul_(s.abs() >= thr.view(-1, *([1] * (s.dim() - 1))))
        total += float(torch.sign(s.sum(0)).sum())
    majority = 1.0 if total >= 0 else -1.0
    for s in stacks.values():
        elected = torch.sign(s.sum(0))
        elected[elected == 0] = majority
        s.mul_((s * elected) > 0)


class _Logits(torch.nn.Module):
    """The data's logits as a module call, so functional_call can substitute the model's weights."""

    def __init__(self, data, model):
        super().__init__()
        self.data = data
        self.inner = model

    def forward(self, batch, task):
        return self.data.logits(self.inner, batch, task)


class _Cycle:
    """Endless batches of one task: the data's order, started again when exhausted."""

    def __init__(self, data, task, split):
        self.data, self.task, self.split, self.it = data, task, split, None

    def next(self):
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.data.batches(self.task, self.split))
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise ValueError(f"AdaMerging: the data gave no {self.split} batches for task {self.task!r}")


def learn_coefficients(ctx, stacks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[float], list[str]]:
    """Adam on the entropy objective; returns (coefficients, loss of every step, keys the model
    does not use - they keep the initial coefficient)."""
    p, data, plan = ctx.params, ctx.data, ctx.plan
    base_sd = {k: ctx.base.get(k) for k in plan.keys + plan.passthrough}
    for alias, canonical in plan.aliases.items():
        base_sd[alias] = base_sd[canonical]
    model = data.model(base_sd)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    names_by_key: dict[str, list[str]] = {}
    for name, key in module_key_map(model, data, plan.keys, plan.aliases).items():
        names_by_key.setdefault(key, []).append(name)
    unused = [k for k in plan.keys if k not in names_by_key]
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    dtypes = {name: own[name].dtype for names in names_by_key.values() for name in names}
    theta0 = {k: base_sd[k].to(stacks[k].dtype).clone() for k in names_by_key}
    del base_sd
    index = {k: i for i, k in enumerate(plan.keys)}
    shape = (len(plan.keys), ctx.num_tasks) if p["granularity"] == "layer" else (ctx.num_tasks,)
    raw = torch.full(shape, float(p["init"]), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=p["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    call = _Logits(data, model)
    cycles = [_Cycle(data, task, p["split"]) for task in ctx.data_tasks]
    losses = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(p["steps"]), desc="AdaMerging", disable=not ctx.progress, leave=False, unit="step"):
        lam = raw.clamp(0.0, 1.0) if p["clamp"] else raw
        weights = {}
        for key, names in names_by_key.items():
            coeff = lam[index[key]] if lam.dim() == 2 else lam
            merged = theta0[key] + torch.tensordot(coeff.to(stacks[key].dtype), stacks[key], dims=1)
            for name in names:
                weights["inner." + name] = merged.to(dtypes[name])
        loss = 0.0
        for task, cycle in zip(ctx.data_tasks, cycles):
            for _ in range(p["batches_per_step"]):
                logits = torch.func.functional_call(call, weights, (cycle.next(), task), tie_weights=False)
                loss = loss + softmax_entropy(logits.to(torch.float32)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = (raw.clamp(0.0, 1.0) if p["clamp"] else raw).detach().clone()
    return final, losses, unused


def prepass(ctx) -> None:
    p = ctx.params
    stacks = {}
    for key in ctx.plan.keys:
        pre = ctx.base.get(key)
        stacks[key] = torch.stack([tv.get(key, pre) for tv in ctx.tasks])
    if p["base"] == "ties":
        ties_split(stacks, ties_thresholds(ctx.base, ctx.tasks, ctx.plan, p["density"], ctx.progress))
    lam, losses, unused = learn_coefficients(ctx, stacks)
    ctx.state.update(stacks=stacks, lam=lam, index={k: i for i, k in enumerate(ctx.plan.keys)})
    names = [tv.name for tv in ctx.tasks]
    if lam.dim() == 1:
        coefficients = dict(zip(names, lam.tolist()))
    else:
        coefficients = {k: dict(zip(names, lam[i].tolist())) for i, k in enumerate(ctx.plan.keys)}
    ctx.report["adamerging"] = {"granularity": p["granularity"], "base": p["base"], "coefficients": coefficients,
                                "entropy_per_step": losses, "keys_not_in_model": unused}


def kernel(deltas, ctx):
    lam = ctx.state["lam"]
    coeff = lam[ctx.state["index"][ctx.key]] if lam.dim() == 2 else lam
    s = ctx.state["stacks"][ctx.key]
    if ctx.rows is not None:
        s = s[:, ctx.rows[0]:ctx.rows[1]]
    return torch.tensordot(coeff.to(s.dtype), s, dims=1)


def after_pass(ctx) -> None:
    ctx.state.pop("stacks", None)


register_method(MergeMethod(
    name="adamerging",
    description="AdaMerging: task arithmetic (or TIES) coefficients, per task or per task and tensor, learned by "
                "minimising prediction entropy on unlabeled inputs (Yang et al. 2024); reads data",
    params=[
        Param("granularity", "choice", "layer", "layer: one coefficient per task and tensor (paper's best); "
              "task: one per task", choices=GRANULARITIES),
        Param("base", "choice", "task_arithmetic", "task vectors as given, or TIES-trimmed and sign-resolved "
              "(AdaMerging++)", choices=BASES),
        Param("init", "float", 0.3, "initial coefficient (paper 0.3)", symbol="lambda"),
        Param("lr", "float", 1e-3, "Adam learning rate (paper 1e-3)", low=0.0, low_open=True),
        Param("steps", "int", 100, "optimisation steps (paper 500; fewer by default for CPU runs)", low=0),
        Param("batches_per_step", "int", 2, "batches of every task per step (paper: 2 of 16 examples)", low=1),
        Param("clamp", "bool", True, "clamp the coefficients to [0, 1] (paper)"),
        Param("density", "float", 0.2, "base ties: fraction of each task vector kept (paper K=20)",
              low=0.0, high=1.0, low_open=True),
        Param("split", "choice", "test", "whose inputs the entropy is measured on (paper: unlabeled test "
              "inputs)", choices=SPLITS),
    ],
    kernel=kernel,
    prepass=prepass,
    after_pass=after_pass,
    label="AdaMerging",
    short_label="AdaM",
    needs_data=True,
    order=62,
))
