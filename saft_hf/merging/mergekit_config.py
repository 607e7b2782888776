"""mergekit YAML configs for `saft-hf merge`: a config with `merge_method:` is translated into a
saft-hf merge config (method + transforms + parameters) with mergekit's semantics.

`MERGEKIT_METHODS` is the whole mapping: one `Row` per mergekit method, naming the saft-hf method
and transforms it runs on, the mergekit parameters it accepts (with mergekit 0.1.5's defaults),
and a `translate` function from resolved mergekit parameters to saft-hf ones. A row whose
saft-hf method or transform is not registered yet gives a "not supported yet" error; adding a
mergekit method is adding a row. Numbers a mergekit user should know (docs/merging.md):

- per tensor, trim keeps exactly max(1, int(n * density)) entries (mergekit's `magnitude`);
- TIES signs are elected on the weighted deltas, ties (sum exactly 0) go to +, and `normalize`
  divides the kept sum by the sum of the weights of the agreeing models;
- DARE keeps each entry with probability `density` and rescales the survivors to the tensor's
  L1 norm (`rescale: true`, skipped when a norm is below 1e-7); the random masks cannot equal
  mergekit's (its global torch RNG), only their distribution does;
- the computation is float32 (mergekit computes in `dtype`); the output is `out_dtype`, else
  `dtype`, else the checkpoints' dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import registry
from .registry import ParamError

REQUIRED = object()  # a per-model parameter mergekit requires (no default)

# Top-level keys of a mergekit config that saft-hf understands.
SUPPORTED_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
DTYPES = ("float32", "float16", "bfloat16")
MODEL_ENTRY_KEYS = ("model", "parameters")
# mergekit leaves a tensor unscaled when its L1 norm before or after a random drop is below this.
MERGEKIT_RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class Row:
    """One mergekit method: what it runs on here and how its parameters translate.

    shared / per_model: mergekit's parameter names -> (type, mergekit default); per-model ones
    may also be given globally (`parameters:`), as mergekit allows. translate(shared, per_model)
    gets the resolved values (per_model: name -> one value per model) and returns (saft-hf
    params, transforms). base: "required" (task-vector methods: models equal to base_model are
    the base itself), "optional" (linear: base_model, if given, is merged as one more model,
    its weight from the global parameters, as mergekit does), "first" (slerp: the base is the
    t = 0 end).
    """

    name: str
    method: str
    transforms: tuple[str, ...]
    shared: Mapping[str, tuple[type, Any]]
    per_model: Mapping[str, tuple[type, Any]]
    translate: Callable[[dict, dict], tuple[dict, list]]
    base: str = "required"
    matches: str = ""  # how close the result is to mergekit's (docs, report)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def missing(self) -> list[str]:
        """saft-hf registry entries this row needs that are not registered."""
        out = [] if self.method in registry.method_names() else [f"method {self.method}"]
        return out + [f"transform {t}" for t in self.transforms if t not in registry.transform_names()]


# ---------------------------------------------------------------------------------------------
# parameter translations


def _coefficients(shared: dict, weights: list[float]) -> list[float]:
    """Per-model coefficients of a linear (non-consensus) task-arithmetic merge: mergekit sums
    w_t tau_t, divides by sum(w) if `normalize` (unless |sum| < 1e-8) and multiplies by lambda."""
    total = sum(weights)
    if shared.get("normalize") and abs(total) >= 1e-8:
        weights = [w / total for w in weights]
    return [w * shared.get("lambda", 1.0) for w in weights]


def _ties_params(shared: dict, weights: list[float], density, trim_rescale: str = "none") -> dict:
    """saft-hf TIES set up as mergekit's consensus merge: per-tensor exact trim (max(1, int(n*d))),
    signs elected on weighted deltas (sum; 0 -> +), mean over the agreeing weights if normalize."""
    out = {"scaling": shared["lambda"], "density": density, "trim_scope": "per_tensor", "trim_count": "exact_min1",
           "weights": weights, "weighting": "mergekit", "sign_method": "sum",
           "disjoint": "mean" if shared["normalize"] else "sum", "zero_sign": "positive"}
    if trim_rescale != "none":
        out["trim_rescale"] = trim_rescale
    return out


def _densities(per_model: dict, method: str) -> list[float]:
    out = []
    for d in per_model["density"]:
        if d <= 0:
            raise ParamError(f"mergekit {method}: density must be > 0 (mergekit would zero that model's task vector), "
                             f"got {d:g}")
        out.append(min(float(d), 1.0))  # mergekit keeps everything at density >= 1
    return out


def _dare(shared: dict, densities: list[float]) -> dict:
    return {"name": "dare", "drop_rate": [1.0 - d for d in densities], "seed": 0,
            "rescale": "l1" if shared["rescale"] else "none", "min_norm": MERGEKIT_RESCALE_EPS}


def _uniform(values: list, what: str, method: str):
    if len(set(values)) > 1:
        raise ParamError(f"mergekit {method}: per-model {what} values {values} differ; saft-hf's {method} takes one "
                         f"{what} for all models (not supported yet): give one value")
    return values[0]


def _linear(shared, per_model):
    return {"weights": per_model["weight"], "normalize": shared["normalize"]}, []


def _task_arithmetic(shared, per_model):
    return {"scaling": _coefficients(shared, per_model["weight"])}, []


def _ties(shared, per_model):
    rescale = "l1" if shared["rescale"] else "none"  # rescale: true = L1 rescale after the magnitude trim
    return _ties_params(shared, per_model["weight"], _densities(per_model, "ties"), rescale), []


def _dare_ties(shared, per_model):
    return _ties_params(shared, per_model["weight"], 1.0), [_dare(shared, _densities(per_model, "dare_ties"))]


def _dare_linear(shared, per_model):
    return {"scaling": _coefficients(shared, per_model["weight"])}, [_dare(shared, _densities(per_model, "dare_linear"))]


def _breadcrumbs_mask(per_model, method):
    d = _uniform(_densities(per_model, method), "density", method)
    gamma = _uniform(per_model["gamma"], "gamma", method)
    return [] if d >= 1.0 else [{"name": "breadcrumbs_mask", "density": d, "beta": gamma}]


def _breadcrumbs(shared, per_model):
    return {"scaling": _coefficients(shared, per_model["weight"])}, _breadcrumbs_mask(per_model, "breadcrumbs")


def _breadcrumbs_ties(shared, per_model):
    return _ties_params(shared, per_model["weight"], 1.0), _breadcrumbs_mask(per_model, "breadcrumbs_ties")


def _magprune(shared, per_model, method):
    d = _uniform(_densities(per_model, method), "density", method)
    eps = _uniform(per_model["epsilon"], "epsilon", method)
    if d >= 1.0:
        return []
    return [{"name": "magprune", "density": d, "epsilon": eps, "seed": 0, "rescale": "l1" if shared["rescale"] else "none"}]


def _della(shared, per_model):
    return _ties_params(shared, per_model["weight"], 1.0), _magprune(shared, per_model, "della")


def _della_linear(shared, per_model):
    return {"scaling": _coefficients(shared, per_model["weight"])}, _magprune(shared, per_model, "della_linear")


def _model_stock(shared, per_model):
    return {"filter_wise": shared["filter_wise"]}, []


def _slerp(shared, per_model):
    return {"t": shared["t"]}, []


# mergekit 0.1.5's generalized task arithmetic parameters (merge_methods/generalized_task_arithmetic.py).
def _gta_shared(normalize: bool, rescale: bool) -> dict:
    return {"int8_mask": (bool, False), "normalize": (bool, normalize), "rescale": (bool, rescale),
            "lambda": (float, 1.0)}


_WD = {"weight": (float, REQUIRED), "density": (float, 1.0)}
_EXACT = "bit for bit on float32 checkpoints with dtype float32"
_CLOSE = "equal up to float32 rounding (coefficients are folded into one per model)"
_RANDOM = "same distribution; random masks differ from mergekit's (its global torch RNG); exact at density 1"

MERGEKIT_METHODS: dict[str, Row] = {row.name: row for row in [
    Row("linear", "weighted_average", (), {"normalize": (bool, True)}, {"weight": (float, REQUIRED)}, _linear,
        base="optional", matches=_CLOSE),
    Row("task_arithmetic", "task_arithmetic", (), _gta_shared(False, False), _WD, _task_arithmetic,
        matches=_CLOSE + "; bit for bit with lambda 1, normalize false",
        notes=("density and rescale do nothing for task_arithmetic (as in mergekit)",)),
    Row("ties", "ties", (), _gta_shared(True, False), _WD, _ties, matches=_EXACT),
    Row("dare_ties", "ties", ("dare",), _gta_shared(False, True), _WD, _dare_ties, matches=_RANDOM),
    Row("dare_linear", "task_arithmetic", ("dare",), _gta_shared(False, True), _WD, _dare_linear, matches=_RANDOM),
    Row("breadcrumbs", "task_arithmetic", ("breadcrumbs_mask",), _gta_shared(False, False),
        {**_WD, "gamma": (float, 0.01)}, _breadcrumbs, matches="not compared yet"),
    Row("breadcrumbs_ties", "ties", ("breadcrumbs_mask",), _gta_shared(False, False),
        {**_WD, "gamma": (float, 0.01)}, _breadcrumbs_ties, matches="not compared yet"),
    Row("della", "ties", ("magprune",), _gta_shared(True, True), {**_WD, "epsilon": (float, 0.15)}, _della,
        matches="not compared yet"),
    Row("della_linear", "task_arithmetic", ("magprune",), _gta_shared(False, True), {**_WD, "epsilon": (float, 0.15)},
        _della_linear, matches="not compared yet"),
    Row("model_stock", "model_stock", (), {"filter_wise": (bool, False)}, {}, _model_stock, matches="not compared yet"),
    Row("slerp", "slerp", (), {"t": (float, REQUIRED)}, {}, _slerp, base="first", matches="not compared yet"),
]}


# ---------------------------------------------------------------------------------------------
# reading a config


def is_mergekit_config(raw) -> bool:
    """A mergekit config names its method `merge_method` (saft-hf's own format: `method`)."""
    return isinstance(raw, Mapping) and "merge_method" in raw


def supported_methods() -> list[str]:
    """mergekit methods this saft-hf can run now (their saft-hf method and transforms are registered)."""
    return [name for name, row in MERGEKIT_METHODS.items() if not row.missing()]


def _show(value) -> str:
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


def _check_value(name: str, kind: type, value, where: str):
    if isinstance(value, (list, dict)):
        raise ParamError(f"{where} {name} is {_show(value)}: mergekit gradients and per-layer filters are not "
                         "supported yet; give one value")
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{where} {name} must be true or false, got {_show(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(f"{where} {name} must be a number, got {_show(value)}")
    return float(value)


def _same_model(a: str, b: str) -> bool:
    norm = (lambda p: os.path.normpath(os.path.abspath(p)) if os.path.exists(p) else p)
    return a == b or norm(a) == norm(b)


def translate(raw: Mapping) -> tuple[dict, list[str]]:
    """A mergekit config -> (saft-hf MergeConfig dict, notes saying what was mapped to what)."""
    unknown = [k for k in raw if k not in SUPPORTED_KEYS]
    if unknown:
        raise ParamError(f"mergekit config key(s) {sorted(map(str, unknown))} are not supported by saft-hf merge; "
                         f"supported: {list(SUPPORTED_KEYS)}")
    name = raw["merge_method"]
    if name not in MERGEKIT_METHODS:
        raise ParamError(f"mergekit merge_method {name!r} is not supported by saft-hf merge; "
                         f"supported: {supported_methods()}")
    row = MERGEKIT_METHODS[name]
    missing = row.missing()
    if missing:
        raise ParamError(f"mergekit merge_method {name!r} is not supported yet: it maps to saft-hf {row.method}"
                         f"{' + ' + ' + '.join(row.transforms) if row.transforms else ''}, and {', '.join(missing)} "
                         f"is not in this saft-hf's registry; supported now: {supported_methods()}")

    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            raise ParamError(f"mergekit {key} {raw[key]!r} is not supported; use one of {list(DTYPES)}")
    if raw.get("tokenizer_source") not in (None, "base"):
        raise ParamError(f"tokenizer_source {raw['tokenizer_source']!r} is not supported (saft-hf copies the "
                         "tokenizer files of the base model); use tokenizer_source: base or omit it")

    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ParamError(f"base_model must be one model path or name, got {_show(base)}")
    if base is None and row.base in ("required", "first"):
        raise ParamError(f"mergekit {name} needs base_model: (the model the fine-tuned ones started from)")

    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ParamError("a mergekit config needs `models:`, a list of {model: PATH, parameters: {...}}")
    global_params = raw.get("parameters") or {}
    if not isinstance(global_params, Mapping):
        raise ParamError(f"`parameters:` must be a mapping of name: value, got {_show(global_params)}")
    accepted = {**row.shared, **row.per_model}
    bad = [k for k in global_params if k not in accepted]
    if bad:
        raise ParamError(f"mergekit {name}: parameter(s) {sorted(map(str, bad))} are not supported; "
                         f"supported: {sorted(accepted)}")

    models, model_params = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping):
            raise ParamError(f"models[{i}] must be a mapping {{model: PATH, parameters: {{...}}}}, got {_show(entry)}")
        bad = [k for k in entry if k not in MODEL_ENTRY_KEYS]
        if bad:
            raise ParamError(f"models[{i}] has unsupported key(s) {sorted(map(str, bad))}; valid: {list(MODEL_ENTRY_KEYS)}")
        if not isinstance(entry.get("model"), str):
            raise ParamError(f"models[{i}].model must be one model path or name, got {_show(entry.get('model'))} "
                             "(mergekit's model+lora syntax and LoRA mappings are not supported; give the LoRA "
                             "adapter directory as the model)")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ParamError(f"models[{i}].parameters must be a mapping, got {_show(params)}")
        bad = [k for k in params if k not in row.per_model]
        if bad:
            raise ParamError(f"models[{i}] ({entry['model']}): per-model parameter(s) {sorted(map(str, bad))} are not "
                             f"supported for {name}; per-model: {sorted(row.per_model) or 'none'}")
        if row.base != "optional" and base is not None and _same_model(entry["model"], base):
            continue  # the base model listed among the models: it is the base, not a task
        models.append(entry["model"])
        model_params.append(params)
    if row.base == "optional" and base is not None and not any(_same_model(m, base) for m in models):
        models.append(base)  # mergekit merges base_model as one more input (its weight from `parameters:`)
        model_params.append({})
    if not models:
        raise ParamError(f"mergekit {name}: no models to merge besides base_model")

    shared = {}
    for pname, (kind, default) in row.shared.items():
        if pname in global_params:
            shared[pname] = _check_value(pname, kind, global_params[pname], "parameters:")
        elif default is REQUIRED:
            raise ParamError(f"mergekit {name} needs parameters: {{{pname}: ...}}")
        else:
            shared[pname] = default
    per_model: dict[str, list] = {}
    for pname, (kind, default) in row.per_model.items():
        values = []
        for model, params in zip(models, model_params):
            if pname in params:
                values.append(_check_value(pname, kind, params[pname], f"{model}:"))
            elif pname in global_params:
                values.append(_check_value(pname, kind, global_params[pname], "parameters:"))
            elif default is REQUIRED:
                raise ParamError(f"mergekit {name} needs {pname} for every model (mergekit requires it too); "
                                 f"{model} has none: add parameters: {{{pname}: 1.0}} to it or to the global parameters")
            else:
                values.append(default)
        per_model[pname] = values

    params, transforms = row.translate(shared, per_model)
    if row.base == "first":
        models, pretrained = [base] + models, None
    else:
        pretrained = base
    out_dtype = raw.get("out_dtype") or raw.get("dtype")
    config = {"method": row.method, "pretrained": pretrained, "models": [{"path": m} for m in models],
              "params": params, "transforms": transforms, "out_dtype": out_dtype}
    shown = f" with {', '.join(t['name'] for t in transforms)} in front" if transforms else ""
    notes = [f"mergekit config (saved as mergekit_config.yml): merge_method {name} runs as saft-hf "
             f"{row.method}{shown}; vs mergekit 0.1.5: {row.matches}"]
    notes += list(row.notes)
    if shared.get("int8_mask"):
        notes.append("int8_mask only sets the dtype of mergekit's sign mask (memory); it changes no value here")
    if raw.get("dtype") not in (None, "float32"):
        notes.append(f"dtype {raw['dtype']}: mergekit computes in it; saft-hf computes in float32 (float64 for "
                     f"float64 checkpoints) and writes {out_dtype}")
    return config, notes
