#!/usr/bin/env python
"""Save the base model (weights + tokenizer) to a local directory; `--tiny` builds a tiny one offline.

    python recipes/llm_sft/export_pretrained.py --model Qwen/Qwen2.5-0.5B --output runs/llm_sft/pretrained
    python recipes/llm_sft/export_pretrained.py --tiny --output runs/llm_sft_tiny/pretrained

Fine-tune from that directory and merge against it, so the task vectors are taken against exactly
the weights fine-tuning started from. The tiny model is a 2-layer Llama (hidden size 32) with a
word-level tokenizer over the synthetic tasks' vocabulary (tasks.py): no network needed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import TASK_WORDS, WORDS  # noqa: E402

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_model_and_tokenizer(seed: int = 0):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + list(TASK_WORDS) + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="Hub name or local directory of a causal LM")
    group.add_argument("--tiny", action="store_true", help="build the tiny 2-layer Llama + word-level tokenizer")
    p.add_argument("--output", required=True, help="new directory (must not exist)")
    args = p.parse_args(argv)
    if os.path.exists(args.output):
        p.error(f"--output {args.output} exists; remove it or pick a new directory")
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
