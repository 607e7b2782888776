"""GLUE text-to-text for seq2seq models: data (data.py), generation-based evaluation (predict.py),
fine-tuning (finetune.py), merging-coefficient search (search.py) (tiny offline stand-ins: saft_hf.testing.glue).
Task definitions (prompts, label words, metrics) live in saft_hf.tasks.glue."""
