"""Hand-written replays of the SAM variants' papers, per optimizer step, independent of saft_hf.sharpness.

`replay_steps` walks the recorded micro-batches of every rank window by window and asks a per-variant
`step_fn(t, params, windows) -> update` for the update direction of optimizer step t (SGD: w -= lr * update).
`windows[r]` is the list of micro-batches rank r saw in that window. Each `*_step` factory below writes
its paper's algorithm for one optimizer step directly, in the paper's notation, with plain torch.
"""

from __future__ import annotations

import math

import torch

from multiproc.sam_reference import _loss, _perturbation


def replay_steps(model, init_state, batches_per_rank, *, grad_accum, lr, step_fn):
    model.load_state_dict(init_state)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach().clone() for n, p in model.named_parameters() if p.requires_grad]
    n_micro = len(batches_per_rank[0])
    for t in range(n_micro // grad_accum):
        windows = [b[t * grad_accum:(t + 1) * grad_accum] for b in batches_per_rank]
        update = step_fn(t, model, names, params, windows)
        params = [p - lr * u for p, u in zip(params, update)]
    return dict(zip(names, params))


def gradient(model, names, params, batch, perturbation=None):
    """d loss / d w at w (+ e), zeros for unused tensors."""
    ps = [(p if perturbation is None else p + e).clone().requires_grad_(True) for p, e in
          zip(params, perturbation if perturbation is not None else params)]
    grads = torch.autograd.grad(_loss(model, ps, names, batch), ps, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def add(a, b, scale=1.0):
    return [x + scale * y for x, y in zip(a, b)]


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(a):
    return torch.sqrt(dot(a, a))


def zeros(params):
    return [torch.zeros_like(p) for p in params]


def sam_e(names, params, g, rho, adaptive=False, eta=0.0, scope="all"):
    return _perturbation(params, names, g, rho, adaptive, eta, scope)


def first_and_perturbed(model, names, params, windows, *, rho, sync, adaptive=False, eta=0.0):
    """SAM per micro-batch (m-sharpness). Returns (sum over micro-batches of the rank-mean plain gradient,
    mean over micro-batches and ranks of the gradient at w + e) for one optimizer step."""
    world, accum = len(windows), len(windows[0])
    g_sum, gs_mean = zeros(params), zeros(params)
    for m in range(accum):
        plain = [gradient(model, names, params, windows[r][m]) for r in range(world)]
        if sync:
            mean = [sum(g[i] for g in plain) / world for i in range(len(params))]
            for_e = [mean] * world
        else:
            for_e = plain
        for r in range(world):
            e = sam_e(names, params, for_e[r], rho, adaptive, eta)
            gs_mean = add(gs_mean, gradient(model, names, params, windows[r][m], e), 1.0 / (accum * world))
            g_sum = add(g_sum, plain[r], 1.0 / world)
    return g_sum, gs_mean


def plain_mean(model, names, params, windows):
    world, accum = len(windows), len(windows[0])
    total = zeros(params)
    for r in range(world):
        for batch in windows[r]:
            total = add(total, gradient(model, names, params, batch), 1.0 / (accum * world))
    return total


def looksam_step(rho, k, alpha, sync=False, adaptive=False):
    """Liu et al. 2022, Algorithm 1: every k steps g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||; else
    g_s = g + alpha ||g|| / ||g_v|| g_v."""
    state = {}

    def step(t, model, names, params, windows):
        if t % k == 0:
            g, g_s = first_and_perturbed(model, names, params, windows, rho=rho, sync=sync, adaptive=adaptive)
            cos = dot(g, g_s) / (norm(g) * norm(g_s))
            state["g_v"] = [gs - norm(g_s) * cos * gi / norm(g) for gs, gi in zip(g_s, g)]
            return g_s
        g = plain_mean(model, names, params, windows)
        g_v = state["g_v"]
        return [gi + alpha * norm(g) / norm(g_v) * v for gi, v in zip(g, g_v)]

    return step


def gsam_step(rho, alpha, sync=False, adaptive=False):
    """Zhuang et al. 2022: update = g_s - alpha * g_perp, g_perp = g - ||g|| cos(g, g_s) g_s / ||g_s||."""

    def step(t, model, names, params, windows):
        g_sum, g_s = first_and_perturbed(model, names, params, windows, rho=rho, sync=sync, adaptive=adaptive)
        g = [x / len(windows[0]) for x in g_sum]  # the mean plain gradient of the step
        cos = dot(g, g_s) / (norm(g) * norm(g_s))
        g_perp = [gi - norm(g) * cos * gs / norm(g_s) for gi, gs in zip(g, g_s)]
        return [gs - alpha * v for gs, v in zip(g_s, g_perp)]

    return step


def sam_or_plain_step(rho, k, sync=False, adaptive=False):
    """sam_interval=k (Composer's `interval`): SAM when t % k == 0, a plain step otherwise."""

    def step(t, model, names, params, windows):
        if t % k:
            return plain_mean(model, names, params, windows)
        return first_and_perturbed(model, names, params, windows, rho=rho, sync=sync, adaptive=adaptive)[1]

    return step


def rwp_seed(seed, step, micro_batch, rank):
    """The noise seed convention of saft_hf (written out again here, so a changed convention is caught)."""
    return ((seed * 1_000_003 + step) * 10_007 + micro_batch) * 101 + rank


def filter_noise(weight, sigma, generator):
    """Flat-LoRA: row i of W gets N(0, sigma^2 ||W_i||^2 / n); vectors get none (and draw nothing)."""
    if weight.dim() < 2:
        return torch.zeros_like(weight)
    z = torch.randn(tuple(weight.shape), generator=generator)
    rows = weight.reshape(weight.shape[0], -1)
    std = sigma * rows.norm(dim=1) / math.sqrt(rows.shape[1])
    return z * std.view(-1, *([1] * (weight.dim() - 1)))


def rwp_step(sigma, seed, sync=False):
    """Li et al. 2024 (RWP): one gradient per micro-batch at w + e, e random, filter-wise scaled."""

    def step(t, model, names, params, windows):
        world, accum = len(windows), len(windows[0])
        total = zeros(params)
        for m in range(accum):
            for r in range(world):
                g = torch.Generator().manual_seed(rwp_seed(seed, t, m, 0 if (sync or world == 1) else r))
                e = [filter_noise(p, sigma, g) for p in params]
                total = add(total, gradient(model, names, params, windows[r][m], e), 1.0 / (accum * world))
        return total

    return step


def _per_example(model, names, params, batch, e=None):
    ps = params if e is None else [p + x for p, x in zip(params, e)]
    out = torch.func.functional_call(model, dict(zip(names, ps)), (batch["x"],))
    return torch.nn.functional.cross_entropy(out["logits"], batch["labels"], reduction="none")


def esam_step(rho, beta, gamma, seed, sync=False, adaptive=False):
    """Du et al. 2022: SWP (each tensor perturbed with probability beta, e = rho/beta * g_S/||g_S||) and SDS
    (second pass on the int(gamma B) examples whose loss rises most at w + e)."""

    def step(t, model, names, params, windows):
        world, accum = len(windows), len(windows[0])
        total = zeros(params)
        for m in range(accum):
            draws = torch.rand(len(params), generator=torch.Generator().manual_seed(rwp_seed(seed, t, m, 0)))
            chosen = [bool(d < beta) for d in draws]
            if not any(chosen):
                chosen[int(draws.argmin())] = True
            idx = [i for i, c in enumerate(chosen) if c]
            plain = [gradient(model, names, params, windows[r][m]) for r in range(world)]
            if sync:
                plain = [[sum(g[i] for g in plain) / world for i in range(len(params))]] * world
            for r in range(world):
                batch = windows[r][m]
                e_sub = sam_e([names[i] for i in idx], [params[i] for i in idx], [plain[r][i] for i in idx],
                              rho / beta, adaptive)
                e = zeros(params)
                for i, x in zip(idx, e_sub):
                    e[i] = x
                with torch.no_grad():
                    rise = _per_example(model, names, params, batch, e) - _per_example(model, names, params, batch)
                keep = torch.topk(rise, max(1, int(len(rise) * gamma))).indices
                subset = {k: v[keep] for k, v in batch.items()}
                total = add(total, gradient(model, names, params, subset, e), 1.0 / (accum * world))
        return total

    return step


def fsam_step(rho, eta, decay=0.0, sync=False, state=None):
    """Kim et al. 2022: e = rho F^-1 g / sqrt(g^T F^-1 g), F = diag(1 + eta * fisher), fisher = g^2 (or a
    running mean of g^2 with `decay`, kept per rank in `state`)."""
    state = {} if state is None else state

    def e_of(g, key):
        if decay > 0:
            old = state.get(key)
            state[key] = [x * x for x in g] if old is None else [decay * o + (1 - decay) * x * x for o, x in zip(old, g)]
            fisher = state[key]
        else:
            fisher = [x * x for x in g]
        inv_f_g = [x / (1 + eta * f) for x, f in zip(g, fisher)]
        return [rho * v / torch.sqrt(dot(g, inv_f_g)) for v in inv_f_g]

    def step(t, model, names, params, windows):
        world, accum = len(windows), len(windows[0])
        total = zeros(params)
        for m in range(accum):
            plain = [gradient(model, names, params, windows[r][m]) for r in range(world)]
            if sync:
                plain = [[sum(g[i] for g in plain) / world for i in range(len(params))]] * world
            for r in range(world):
                e = e_of(plain[r], r)
                total = add(total, gradient(model, names, params, windows[r][m], e), 1.0 / (accum * world))
        return total

    return step
