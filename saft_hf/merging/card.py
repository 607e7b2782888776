"""Model card (README.md) for a merged model: provenance the Hub understands (`base_model:`
list, `merge` tag) plus the method, its parameters and what was done to tied weights / LoRA."""
from __future__ import annotations

import yaml

from . import registry

# keys of the merge report that are not a method's own statistics
_REPORT_KEYS = {"method", "params", "transforms", "notes", "shards", "copied_files", "merged_tensors",
                "copied_buffers", "tied_aliases", "total_bytes"}


def _method_lines(config: dict, stats: dict) -> list[str]:
    """Method and transforms with every declared parameter (from the registry), defaults marked."""
    method = registry.get_method(config["method"])
    given = config.get("params") or {}
    resolved = stats.get("params") or registry.validate_params(config["method"], given)
    lines = [f"- Method: `{method.name}` ({method.description})", "- Parameters:"]
    for p in method.params:
        if p.name in resolved:
            mark = "" if p.name in given else " (default)"
            lines.append(f"  - `{p.name}`: `{resolved[p.name]}`{mark} - {p.help}")
    for t in stats.get("transforms") or []:
        shown = ", ".join(f"{k}={v}" for k, v in t.items() if k != "name")
        lines.append(f"- Transform before merging: `{t['name']}` ({shown})")
    return lines


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
    lines += _method_lines(config, stats or {})
    if stats:
        extra = {k: v for k, v in stats.items() if k not in _REPORT_KEYS and v is not None}
        if extra:
            lines += ["- Merge statistics:"] + [f"  - `{k}`: `{v}`" for k, v in extra.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "The full configuration is in `merge_config.yaml` next to the weights.", ""]
    return "\n".join(lines)
