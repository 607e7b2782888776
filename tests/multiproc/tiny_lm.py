"""A tiny Llama-shaped causal LM, an offline word-level tokenizer, tiny SFT/DPO data, and hand SAM replays.

The replays use plain torch (full logits, log_softmax) on the micro-batches the trainer recorded, so
they are independent of TRL's fused LM head and of saft_hf.sharpness.
"""

from __future__ import annotations

import torch

from .sam_reference import _perturbation

WORDS = (
    "the a cat dog bird sees likes eats runs sleeps on under red blue green big small fast slow "
    "yes no good bad question answer is not and or one two three"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_model(seed: int = 0, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(SPECIAL) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _sentences(n: int, seed: int) -> list[list[str]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 7, (1,), generator=g))
        out.append([WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)])
    return out


def sft_dataset(n: int = 16, seed: int = 0):
    """Prompt-completion pairs (the loss is on the completion only)."""
    from datasets import Dataset

    prompts, completions = _sentences(n, seed), _sentences(n, seed + 1)
    return Dataset.from_dict(
        {"prompt": [" ".join(p) for p in prompts], "completion": [" " + " ".join(c) for c in completions]}
    )


def dpo_dataset(n: int = 16, seed: int = 0):
    from datasets import Dataset

    prompts, chosen, rejected = _sentences(n, seed), _sentences(n, seed + 1), _sentences(n, seed + 2)
    return Dataset.from_dict(
        {
            "prompt": [" ".join(p) for p in prompts],
            "chosen": [" " + " ".join(c) for c in chosen],
            "rejected": [" " + " ".join(r) for r in rejected],
        }
    )


# ---------------------------------------------------------------------------- replay
def _token_logps(model, names, params, batch):
    """log p(token_t | tokens_<t) for t >= 1 (shape [B, T-1]), from the full logits."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    logits = torch.func.functional_call(model, dict(zip(names, params)), (), kwargs).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    return logps.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)


def sft_loss(model, names, params, batch, num_items):
    """SFT's token NLL: sum over the label tokens, divided by the tokens of the whole optimizer step."""
    labels = batch["labels"][:, 1:]
    logits = torch.func.functional_call(
        model,
        dict(zip(names, params)),
        (),
        {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False},
    ).logits.float()[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll / num_items


def dpo_loss(model, names, params, batch, ref_logps, beta):
    """DPO's sigmoid loss; `batch` is [chosen; rejected], `ref_logps` the reference sums, same order."""
    mask = batch["completion_mask"][:, 1:].to(torch.float32)
    logps = (_token_logps(model, names, params, batch) * mask).sum(dim=1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


@torch.no_grad()
def sequence_logps(model, batch):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    mask = batch["completion_mask"][:, 1:].to(torch.float32)
    return (_token_logps(model, names, params, batch) * mask).sum(dim=1)


def replay_sam_lm(
    model,
    init_state: dict,
    batches_per_rank: list[list[dict]],
    loss_fn,
    *,
    grad_accum: int,
    lr: float,
    rho: float,
    adaptive: bool,
    eta: float = 0.0,
    scope: str = "all",
    divide_by_accum: bool = False,
) -> dict:
    """SGD with per-micro-batch SAM/ASAM (local perturbation per rank), gradients averaged over ranks.

    `loss_fn(model, names, params, record)` is the micro-batch loss; `divide_by_accum` divides it by
    the accumulation steps (losses the Trainer scales, e.g. DPO's), SFT's is already normalised by
    the step's token count.
    """
    model.load_state_dict(init_state)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach().clone() for _, p in model.named_parameters() if p.requires_grad]
    world = len(batches_per_rank)
    n_micro = len(batches_per_rank[0])
    accum = [torch.zeros_like(p) for p in params]
    scale = 1.0 / (grad_accum if divide_by_accum else 1) / world
    for step in range(n_micro):
        for rank in range(world):
            record = batches_per_rank[rank][step]
            if rho > 0:
                ps = [p.clone().requires_grad_(True) for p in params]
                first = torch.autograd.grad(loss_fn(model, names, ps, record), ps, allow_unused=True)
                first = [g if g is not None else torch.zeros_like(p) for g, p in zip(first, params)]
                e = _perturbation(params, names, first, rho, adaptive, eta, scope)
            else:
                e = [torch.zeros_like(p) for p in params]
            ps = [(p + ei).requires_grad_(True) for p, ei in zip(params, e)]
            grads = torch.autograd.grad(loss_fn(model, names, ps, record), ps, allow_unused=True)
            for a, g in zip(accum, grads):
                if g is not None:
                    a += g * scale
        if (step + 1) % grad_accum == 0:
            params = [p - lr * a for p, a in zip(params, accum)]
            accum = [torch.zeros_like(p) for p in params]
    return dict(zip(names, params))
