#!/usr/bin/env python
"""Supervised fine-tuning of a causal LM on one task with SAFT (SAM / ASAM) inside TRL's SFTTrainer.

    accelerate launch recipes/llm_sft/sft.py --config recipes/llm_sft/configs/gsm8k.yaml \
        --model_name_or_path runs/llm_sft/pretrained --output_dir runs/llm_sft/sft/gsm8k

Every field of `TaskArguments` (tasks.py) and of `SAFTSFTConfig` (= TRL's SFTConfig plus the
`sam_*` knobs) can be set in the YAML file(s) given with `--config` and overridden on the command
line (`--sam_rho 0` trains without SAM, `--lora_r 16` trains LoRA adapters). The model and the
tokenizer are saved to `output_dir`, ready for `saft-hf merge`.
"""
import json
import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import TaskArguments, load_train, parse_with_config  # noqa: E402


@dataclass
class LoraArguments:
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 (default) fine-tunes every weight."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Modules to adapt, or 'all-linear'."})


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saft_hf.trl import SAFTSFTConfig, SAFTSFTTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    task, lora, config = parse_with_config(
        (TaskArguments, LoraArguments, SAFTSFTConfig), sys.argv[1:] if argv is None else argv
    )
    peft_config = None
    if lora.lora_r > 0:
        from peft import LoraConfig

        variant = getattr(config, "sam_variant", "asam" if getattr(config, "sam_adaptive", True) else "sam")
        if config.sam_rho > 0 and "asam" in str(variant) and config.sam_eta == 0:
            logging.warning(
                "ASAM with LoRA and sam_eta=0: LoRA's B matrices start at zero, so T = |w| + eta gives them no "
                "perturbation at first. Set --sam_eta 0.01 (as recipes/flan_t5_glue/configs/asam_lora.yaml)."
            )
        targets = lora.lora_target_modules
        peft_config = LoraConfig(
            r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task_type="CAUSAL_LM",
        )
    tokenizer = AutoTokenizer.from_pretrained(task.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(task.model_name_or_path)
    train = load_train(task)
    trainer = SAFTSFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    result = trainer.train()
    trainer.save_model(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(config.output_dir, "train_results.json"), "w", encoding="utf-8") as handle:
            json.dump({"task": task.task_name, **result.metrics}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
