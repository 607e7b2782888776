"""CLIP vision family: model building (encoder + cached zero-shot heads), data loading and
preprocessing without torchvision, evaluation, and the fine-tuning recipe's logic.

Task facts (datasets, class names, templates) live in `saft_hf.tasks.vision`.
"""
