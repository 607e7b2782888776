#!/usr/bin/env python
"""Mean completion-token loss (NLL) of a causal LM on each task's evaluation split.

    python recipes/llm_sft/evaluate_loss.py --model runs/llm_sft/merged \
        --tasks recipes/llm_sft/configs/gsm8k.yaml recipes/llm_sft/configs/code_alpaca.yaml \
        --output runs/llm_sft/merged/task_loss.json

The loss is SFT's: the prompt is context, only the completion (plus EOS) is scored, averaged over
completion tokens. `--set key=value` overrides a task-config field for every task (e.g.
`--set max_eval_samples=50`).
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import TaskArguments, load_eval, parse_with_config  # noqa: E402


def completion_loss(model, tokenizer, dataset, batch_size: int = 8) -> float:
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = list(dataset)
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, labels = [], []
        for row in batch:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(prompt + completion)
            labels.append([-100] * len(prompt) + completion)
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        target = torch.tensor([y + [-100] * (width - len(y)) for y in labels], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((target[:, 1:] != -100).sum())
    return total / max(count, 1)


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (fine-tuned, merged or base)")
    p.add_argument("--tasks", nargs="+", required=True, help="task config YAML files (configs/*.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override task-config fields")
    p.add_argument("--output", help="write the losses as JSON here")
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args(argv)
    overrides = []
    for item in args.set:
        if "=" not in item:
            p.error(f"--set {item!r}: use KEY=VALUE")
        key, value = item.split("=", 1)
        overrides += [f"--{key}", value]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    losses = {}
    for config in args.tasks:
        (task,) = parse_with_config((TaskArguments,), ["--config", config, *overrides], ignore_unknown_config_keys=True)
        dataset = load_eval(task)
        loss = completion_loss(model, tokenizer, dataset, args.batch_size)
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss} for task {task.task_name} with {args.model}")
        losses[task.task_name] = loss
        print(f"{task.task_name}: loss {loss:.4f} ({len(dataset)} rows) - {args.model}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "loss": losses}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
