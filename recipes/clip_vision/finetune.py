#!/usr/bin/env python
"""Fine-tune a CLIP image encoder on one of the paper's 8 vision tasks with SAFT (ASAM) or plain AdamW.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/clip_vision/finetune.py --config recipes/clip_vision/configs/eurosat.yaml \
        --sam_rho 0.5 --output_dir runs/clip_vision/ViT-B-32/asam/full/eurosat

Every YAML option can be overridden on the command line (`--sam_rho 0` for the SGD baseline,
`--finetuning_mode ftlo|ftts`, `--model_name_or_path openai/clip-vit-base-patch16`,
`--data_path DIR`, ...); `--help` lists them all. The logic lives in `saft_hf.vision.finetune`.
"""
import logging
import sys

from saft_hf.vision.finetune import parse_vision_arguments, run_vision_finetuning


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_vision_arguments(argv)
    result = run_vision_finetuning(model_args, data_args, training_args)
    print(f"{result['task']}: test accuracy {100 * result['test_accuracy']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
