#!/usr/bin/env python
"""Fine-tune Flan-T5 on one GLUE task (text-to-text) with SAFT (ASAM) or plain AdamW, full or LoRA.

    accelerate launch recipes/flan_t5_glue/finetune.py --config recipes/flan_t5_glue/configs/asam.yaml \
        --task cola --output_dir runs/flan_t5_glue/asam/cola

Every option of the YAML file can be overridden on the command line (`--sam_rho 0`, `--lora_r 8`,
`--data_path DIR`, ...); `--help` lists them all. The logic lives in `saft_hf.glue.finetune`.
"""
import logging
import sys

from saft_hf.glue.finetune import parse_glue_arguments, run_glue_finetuning


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, lora_args, training_args = parse_glue_arguments(argv)
    run_glue_finetuning(model_args, data_args, lora_args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
