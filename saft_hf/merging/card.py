"""Model card (README.md) for a merged model: provenance the Hub understands (`base_model:`
list, `merge` tag) plus the method, its parameters and what was done to tied weights / LoRA."""
from __future__ import annotations

import yaml


def model_card(config: dict, notes: list[str], stats: dict | None = None) -> str:
    models = [m["path"] for m in config["models"]]
    bases = ([config["pretrained"]] if config.get("pretrained") else []) + models
    front = {"base_model": bases, "tags": ["merge", "saft-hf", config["method"]], "library_name": "transformers"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# Merged model ({config['method']})", "",
             "Merged with `saft-hf merge` (saft_hf.merging), streaming tensor by tensor.", ""]
    if config.get("pretrained"):
        lines += [f"- Pretrained model: `{config['pretrained']}`"]
    lines += ["- Fine-tuned models (task vector = fine-tuned - pretrained):"]
    lines += [f"  - `{m.get('name', m['path'])}`: `{m['path']}`" for m in config["models"]]
    lines += [f"- Method: `{config['method']}`", "- Parameters:"]
    lines += [f"  - `{k}`: `{v}`" for k, v in (config.get("params") or {}).items()] or ["  - (defaults)"]
    if config.get("dare"):
        lines += [f"- DARE before merging: `{config['dare']}`"]
    if stats:
        extra = {k: v for k, v in stats.items() if k in ("thresholds", "majority_sign", "deferred_keys") and v is not None}
        if extra:
            lines += ["- Merge statistics:"] + [f"  - `{k}`: `{v}`" for k, v in extra.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "The full configuration is in `merge_config.yaml` next to the weights.", ""]
    return "\n".join(lines)
