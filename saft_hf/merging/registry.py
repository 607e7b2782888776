"""The one list of merge methods and task-vector transforms.

A method is a small declaration (`MergeMethod`): its parameters (`Param`: type, default, range or
choices, search grid, help) and a kernel that gets the stacked task deltas of one tensor (or row
block of a tensor) and returns the merged delta. The streaming engine (`engine.run_method`) is
the only executor. A transform (`Transform`, e.g. DARE) rewrites each task vector tensor by
tensor in front of any method that takes task vectors.

Built-in definitions live one per file in `saft_hf/merging/methods/` and
`saft_hf/merging/transforms/` and are imported on the first lookup; any other code (a test, a
user script) can `register_method(...)` / `register_transform(...)` its own. YAML validation,
`saft-hf merge --help`, coefficient search, the model card, the merge report and the method
lists of the studies all read this registry.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib
import math
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

KINDS = ("float", "int", "bool", "choice", "per_task_float")


class ParamError(ValueError):
    """A merge parameter is unknown, of the wrong type or out of range (the message names it)."""


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    kind: "float" | "int" | "bool" | "choice" | "per_task_float" (one number, or one per task).
    low/high: valid range (inclusive unless low_open/high_open); choices: allowed values of a
    "choice" (compared with their type, so `True` is not `1`). grid: the values coefficient
    search tries by default (None: not searched). default None means "absent" (e.g. uniform
    weights); an explicit null is never accepted.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    grid: tuple | None = None
    symbol: str | None = None  # how reports name it ("alpha", "lambda")
    required: bool = False  # must be given (no default)
    per_layer: bool = False  # also accepts [{pattern|glob: ..., value: ...}, ..., {value: default}] (see layer_rules)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Param {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"Param {self.name}: a choice needs `choices`")
        if self.per_layer and self.kind not in ("float", "per_task_float"):
            raise ValueError(f"Param {self.name}: per_layer applies to float or per_task_float parameters")

    def range_text(self) -> str:
        if self.kind == "choice":
            return " | ".join(_show(c) for c in self.choices)
        if self.kind == "bool":
            return "true | false"
        if self.low is None and self.high is None:
            return "any finite number" if self.kind != "int" else "any integer"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


@dataclass
class MergeContext:
    """What a kernel and the hooks of a method see while the engine streams one merge."""

    method: "MergeMethod"
    params: dict  # resolved parameters
    base: Any  # TensorSource of the pretrained (or reference) model
    tasks: list  # TaskVector objects, transforms already applied
    plan: Any  # MergePlan
    progress: bool = False
    state: dict = field(default_factory=dict)  # the method's own model-wide state (thresholds, ...)
    report: dict = field(default_factory=dict)  # statistics for merge_report.json and the model card
    key: str = ""  # tensor being merged
    rows: tuple | None = None  # its row block (start, stop), or None for the whole tensor
    pre: Any = None  # the pretrained (reference) tensor of that block, as read from `base`
    key_state: dict = field(default_factory=dict)  # per-tensor cache, emptied at each new key
    final: bool = False  # True while the engine re-runs blocks a kernel deferred
    deferred: list = field(default_factory=list)  # (key, rows) blocks deferred in the main pass
    data: Any = None  # the MergeData of a method with needs_data (see data.py)
    data_tasks: list = field(default_factory=list)  # the data's task name for each task vector
    stats: list = field(default_factory=list)  # per task: datastats.TaskStats from the method's `collect`

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


DEFER = object()  # a kernel may return this: "run me again after the main pass" (TIES majority sign)


@dataclass
class MergeMethod:
    """A merge method.

    kernel(deltas, ctx) -> merged delta: `deltas` is a T x (tensor or row block) float tensor of
    the task deltas (a scratch buffer the kernel may modify); the result is added to the
    pretrained weights: out = base_scale(ctx) * theta_0 + merged (a new tensor, not a view of
    `deltas`). Return `DEFER` to have the
    block computed again (with ctx.final=True) after the main pass and `after_pass`.
    prepass(ctx): optional, runs before the main pass (e.g. TIES's model-wide trim threshold).
    linear_param: a scalar parameter that only scales the merged delta linearly (merged(p) =
    p * merged(1)); coefficient search then computes the direction once per setting of the
    other parameters and reuses it along this parameter.
    needs_pretrained: False if the method is defined on the fine-tuned models alone (the first
    model is then the reference). takes_task_vectors: transforms (DARE) may be put in front.
    in_study: listed (in `order`) by the studies (demo, vision, GLUE) by default.
    fixed_ablation: params of an extra study row with this method at fixed values (paper table 6).
    coefficient(params, num_tasks): the number a study shows in its `coef` column.
    whole_tensors: the kernel always gets whole tensors (methods that need an SVD of each matrix);
    otherwise tensors above engine.PIECE_ELEMENTS entries arrive in row blocks.
    needs_data: the method reads each task's inputs through a `data.MergeData` (ctx.data; a merge
    without one is refused with a message saying how to give it). collect(model, task, data, ctx)
    -> {name: tensor}: optional per-task statistics, computed in one pass over that task's data with
    the task's fine-tuned model and cached (in memory, and beside the checkpoint on disk: see
    datastats.py); the kernel reads them as ctx.stats[t].get(name). data_params: the parameters the
    statistics depend on (part of the cache key; the others can change without recomputing).
    num_tasks: (min, max) number of task vectors (models) the method accepts, max None = any
    (SLERP: (2, 2)); checked with a clear error, and studies skip a method outside its range.
    pre_transforms(params) -> [(transform name, transform params)]: transforms that are part of
    the method itself (Breadcrumbs' band mask, DELLA's MagPrune), applied by the engine to every
    task vector in front of the kernel, after any user transforms.
    """

    name: str
    description: str
    params: Sequence[Param]
    kernel: Callable
    label: str | None = None
    short_label: str | None = None
    needs_pretrained: bool = True
    takes_task_vectors: bool = True
    prepass: Callable | None = None
    after_pass: Callable | None = None
    linear_param: str | None = None
    base_scale: Callable[[MergeContext], float] | None = None  # after the prepass; default 1
    check: Callable[[dict, int | None], None] | None = None  # cross-parameter validation
    in_study: bool = False
    fixed_ablation: Mapping | None = None
    order: int = 100
    coefficient: Callable[[dict, int], Any] | None = None  # the `coef` a study reports; default: linear_param's value
    whole_tensors: bool = False  # kernel needs whole matrices (SVD methods): no row blocks
    needs_data: bool = False  # reads task inputs through a MergeData (RegMean, Fisher, AdaMerging)
    collect: Callable | None = None  # per-task statistics from one pass over the data (cached)
    data_params: Sequence[str] = ()  # params the collected statistics depend on (cache key)
    num_tasks: tuple = (1, None)  # (min, max) task vectors accepted; max None = any
    pre_transforms: Callable[[dict], list] | None = None  # built-in transforms from the params

    def __post_init__(self):
        self.params = tuple(self.params)
        self.data_params = tuple(self.data_params)
        self.label = self.label or self.name.replace("_", " ")
        self.short_label = self.short_label or self.label
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name}: duplicate parameter names {names}")
        if self.linear_param is not None and self.linear_param not in names:
            raise ValueError(f"method {self.name}: linear_param {self.linear_param!r} is not one of its parameters")
        if (self.collect is not None or self.data_params) and not self.needs_data:
            raise ValueError(f"method {self.name}: `collect` / `data_params` need needs_data=True")
        unknown = [p for p in self.data_params if p not in names]
        if unknown:
            raise ValueError(f"method {self.name}: data_params {unknown} are not among its parameters {names}")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def accepts(self, num_tasks: int) -> bool:
        lo, hi = self.num_tasks
        return num_tasks >= lo and (hi is None or num_tasks <= hi)

    def check_num_tasks(self, num_tasks: int) -> None:
        if not self.accepts(num_tasks):
            lo, hi = self.num_tasks
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise ParamError(f"method {self.name} merges {want} models (task vectors), got {num_tasks}; "
                             f"give {want} or choose another method")

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params if p.default is not None}

    def grid(self) -> dict:
        """Default coefficient-search grid: {param: values} for every parameter with a grid."""
        return {p.name: list(p.grid) for p in self.params if p.grid is not None}


@dataclass
class Transform:
    """A task-vector transform: apply(delta, key, task_index, params) -> new delta, called once
    per task vector tensor (whole tensor, float32/64) before the method's kernel. It must depend
    only on its arguments (not on read order), so repeated passes agree."""

    name: str
    description: str
    params: Sequence[Param]
    apply: Callable
    label: str | None = None
    order: int = 100
    check: Callable[[dict], None] | None = None  # cross-parameter validation (raise ParamError)

    def __post_init__(self):
        self.params = tuple(self.params)
        self.label = self.label or self.name

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params if p.default is not None}

    def grid(self) -> dict:
        return {p.name: list(p.grid) for p in self.params if p.grid is not None}


_METHODS: dict[str, MergeMethod] = {}
_TRANSFORMS: dict[str, Transform] = {}
# Search-only names: a method with transforms in front (kept for existing callers).
_SEARCH_ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {}
_loaded = False


def _load_builtins() -> None:
    """Import every module of the built-in packages once (each registers itself)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in ("saft_hf.merging.methods", "saft_hf.merging.transforms"):
        pkg = importlib.import_module(package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")


def register_method(method: MergeMethod | None = None, *, replace: bool = False, **fields):
    """Register a method: `register_method(MergeMethod(...))`, or as a decorator on the kernel:
    `@register_method(name=..., description=..., params=[...])`."""
    if method is None:
        def decorate(kernel):
            register_method(MergeMethod(kernel=kernel, **fields), replace=replace)
            return kernel
        return decorate
    if not replace and method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    if method.name in _TRANSFORMS or method.name in _SEARCH_ALIASES:
        raise ValueError(f"{method.name!r} is already the name of a transform or search alias")
    _METHODS[method.name] = method
    return method


def register_transform(transform: Transform | None = None, *, replace: bool = False, **fields):
    """Register a task-vector transform (same two forms as `register_method`)."""
    if transform is None:
        def decorate(apply):
            register_transform(Transform(apply=apply, **fields), replace=replace)
            return apply
        return decorate
    if not replace and transform.name in _TRANSFORMS:
        raise ValueError(f"transform {transform.name!r} is already registered")
    if transform.name in _METHODS:
        raise ValueError(f"{transform.name!r} is already the name of a merge method")
    _TRANSFORMS[transform.name] = transform
    return transform


def register_search_alias(name: str, method: str, transforms: Sequence[str]) -> None:
    """A search name meaning `method` with `transforms` in front (e.g. dare_ties = dare + ties)."""
    _SEARCH_ALIASES[name] = (method, tuple(transforms))


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def unregister_transform(name: str) -> None:
    _TRANSFORMS.pop(name, None)


def method_names(study_only: bool = False, num_tasks: int | None = None) -> list[str]:
    """Registered method names in display order (`order`, then name); with `num_tasks`, only the
    methods that accept that many task vectors (SLERP needs exactly two)."""
    _load_builtins()
    ms = sorted(_METHODS.values(), key=lambda m: (m.order, m.name))
    return [m.name for m in ms if (m.in_study or not study_only) and (num_tasks is None or m.accepts(num_tasks))]


def transform_names() -> list[str]:
    _load_builtins()
    return [t.name for t in sorted(_TRANSFORMS.values(), key=lambda t: (t.order, t.name))]


def search_names() -> list[str]:
    """Every name `search_coefficients(method=...)` accepts: methods, then aliases."""
    _load_builtins()
    return method_names() + [a for a, (m, _) in _SEARCH_ALIASES.items() if m in _METHODS]


def resolve_search_name(name: str) -> tuple[MergeMethod, tuple[str, ...]]:
    """(method, transform names) for a method name or a search alias."""
    _load_builtins()
    if name in _SEARCH_ALIASES:
        method, transforms = _SEARCH_ALIASES[name]
        return get_method(method), transforms
    return get_method(name), ()


def get_method(name) -> MergeMethod:
    _load_builtins()
    if not isinstance(name, str):
        raise ParamError(f"method must be one name (a string), got {_show(name)}; choose one of {method_names()}")
    if name not in _METHODS:
        raise ParamError(f"unknown merge method {name!r}; choose one of {method_names()}")
    return _METHODS[name]


def get_transform(name) -> Transform:
    _load_builtins()
    if not isinstance(name, str) or name not in _TRANSFORMS:
        raise ParamError(f"unknown transform {_show(name)}; choose one of {transform_names()}")
    return _TRANSFORMS[name]


# ----------------------------------------------------------------------------------------------
# validation


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    return repr(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(p: Param, value, where: str) -> float:
    if isinstance(value, str):
        raise ParamError(f"{where} must be a number, got the string {value!r}; write it without quotes")
    if not _is_number(value):
        raise ParamError(f"{where} must be a number, got {_show(value)} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ParamError(f"{where} must be a finite number, got {value}")
    if p.low is not None and (value < p.low or (p.low_open and value == p.low)) or \
            p.high is not None and (value > p.high or (p.high_open and value == p.high)):
        raise ParamError(f"{where} must be in {p.range_text()}, got {value:g}")
    return value


_RULE_EXAMPLE = "[{pattern: 'mlp', value: 0.5}, {glob: '*.ln_*', value: [0.3, 0.4]}, {value: 0.3}]"


def is_layer_rules(value) -> bool:
    """True for a per-layer value: a list of mappings (rules), not numbers."""
    return isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return re.compile(pattern)


def _rule_matches(rule: Mapping, key: str) -> bool:
    if "pattern" in rule:
        return _compiled(rule["pattern"]).search(key) is not None
    if "glob" in rule:
        return fnmatch.fnmatchcase(key, rule["glob"])
    return True  # the default rule


def layer_value(value, key: str):
    """The value of a (possibly per-layer) parameter for tensor `key`: rules are tried in order,
    the first whose `pattern` (regex, searched in the name) or `glob` (whole name) matches wins,
    the last rule (value only) is the default. Plain values are returned unchanged."""
    if not is_layer_rules(value):
        return value
    for rule in value:
        if _rule_matches(rule, key):
            return rule["value"]
    raise AssertionError("validated layer rules end with a default")  # pragma: no cover


def _check_layer_rules(p: Param, rules, where: str, num_tasks: int | None) -> list[dict]:
    plain = Param(p.name, p.kind, None, p.help, p.low, p.high, p.low_open, p.high_open)
    out = []
    for i, rule in enumerate(rules):
        at = f"{where}[{i}]"
        if not isinstance(rule, Mapping):
            raise ParamError(f"{at} must be a mapping like {{pattern: 'mlp', value: 0.5}}, got {_show(rule)}; "
                             f"per-layer values look like {_RULE_EXAMPLE}")
        unknown = sorted(map(str, set(rule) - {"pattern", "glob", "value"}))
        if unknown:
            raise ParamError(f"{at} has unknown key(s) {unknown}; allowed: pattern (regex), glob, value")
        if "value" not in rule:
            raise ParamError(f"{at} has no `value`")
        if "pattern" in rule and "glob" in rule:
            raise ParamError(f"{at} has both `pattern` and `glob`; give one")
        matcher = "pattern" if "pattern" in rule else "glob" if "glob" in rule else None
        if matcher is not None:
            text = rule[matcher]
            if not isinstance(text, str) or not text:
                raise ParamError(f"{at}.{matcher} must be a non-empty string, got {_show(text)}")
            if matcher == "pattern":
                try:
                    _compiled(text)
                except re.error as e:
                    raise ParamError(f"{at}.pattern {text!r} is not a valid regular expression ({e}); "
                                     "escape special characters or use `glob:`") from None
        elif i != len(rules) - 1:
            raise ParamError(f"{at} has no `pattern` or `glob`: only the last rule may be the default "
                             "(the value for tensors no rule matches)")
        value = rule["value"]
        if is_layer_rules(value):
            raise ParamError(f"{at}.value must be a number{' or one per model' if p.kind == 'per_task_float' else ''}, "
                             "not nested rules")
        item = {matcher: rule[matcher]} if matcher else {}
        item["value"] = check_value(plain, value, f"{at}.value", num_tasks)
        out.append(item)
    if not out or len(out[-1]) != 1:
        raise ParamError(f"{where}: per-layer rules must end with a default rule {{value: ...}} for the tensors "
                         f"no pattern matches, e.g. {_RULE_EXAMPLE}")
    return out


def check_value(p: Param, value, where: str, num_tasks: int | None = None):
    """One parameter value, type- and range-checked; returns the normalized value."""
    if value is None:
        hint = "omit the key to use the default" + (f" ({_show(p.default)})" if p.default is not None else "")
        raise ParamError(f"{where} is null; give a value ({p.range_text()}) or {hint}")
    if p.per_layer and is_layer_rules(value):
        return _check_layer_rules(p, value, where, num_tasks)
    if p.kind == "float":
        return _check_number(p, value, where)
    if p.kind == "int":
        if isinstance(value, str) or not _is_number(value) or (isinstance(value, float) and not value.is_integer()):
            raise ParamError(f"{where} must be an integer, got {_show(value)}")
        return int(_check_number(p, value, where))
    if p.kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(f"{where} must be true or false (a YAML boolean, not quoted), got {_show(value)}")
        return value
    if p.kind == "choice":
        for c in p.choices:
            if type(c) is type(value) and c == value:
                return value
        raise ParamError(f"{where} must be one of {p.range_text()}, got {_show(value)}")
    # per_task_float: one number for all tasks, or a list with one per task
    if isinstance(value, (list, tuple)):
        if not value:
            raise ParamError(f"{where} is an empty list; give one number or one per task")
        if num_tasks is not None and len(value) != num_tasks:
            raise ParamError(f"{where} has {len(value)} values but there are {num_tasks} task vectors; "
                             "give one number or one per task")
        return [_check_number(p, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return _check_number(p, value, where)


def _check_params(owner: str, declared: Sequence[Param], raw, num_tasks: int | None, what: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamError(f"{what} for {owner} must be a mapping of name: value, got {_show(raw)}")
    by_name = {p.name: p for p in declared}
    unknown = [k for k in raw if k not in by_name]
    if unknown:
        raise ParamError(f"unknown parameter(s) {sorted(map(str, unknown))} for {owner}; "
                         f"valid: {sorted(by_name) or 'none'}")
    out = {}
    for p in declared:
        if p.name in raw:
            out[p.name] = check_value(p, raw[p.name], f"{owner} {p.name}", num_tasks)
        elif p.required:
            raise ParamError(f"{owner} needs {p.name} ({p.range_text()}): {p.help}")
        elif p.default is not None:
            out[p.name] = p.default
    return out


def validate_params(name: str, raw_params=None, num_tasks: int | None = None) -> dict:
    """Strictly checked parameters of method `name`, defaults filled in (declaration order).

    Rejects unknown keys (listing the valid ones), wrong types (a quoted number, a quoted
    boolean), null, NaN/Inf, out-of-range values and per-task lists of the wrong length (when
    `num_tasks` is known). Raises ParamError (a ValueError) naming the parameter.
    """
    method = get_method(name)
    params = _check_params(name, method.params, raw_params, num_tasks, "params")
    if num_tasks is not None:
        method.check_num_tasks(num_tasks)
    if method.check is not None:
        method.check(params, num_tasks)
    return params


def validate_transform_params(name: str, raw_params=None) -> dict:
    """Strictly checked parameters of transform `name` (same rules as `validate_params`)."""
    transform = get_transform(name)
    params = _check_params(name, transform.params, raw_params, None, "params")
    if transform.check is not None:
        transform.check(params)
    return params


def parse_transforms(raw, context: str = "transforms") -> list[tuple[str, dict]]:
    """`[{name: dare, drop_rate: 0.5}, "other", ...]` -> [(name, resolved params)]."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise ParamError(f"{context} must be a list like [{{name: dare, drop_rate: 0.5}}], got {_show(raw)}")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, Mapping):
            if "name" not in item:
                raise ParamError(f"{context}[{i}] has no `name`; choose one of {transform_names()}")
            name, params = item["name"], {k: v for k, v in item.items() if k != "name"}
        else:
            raise ParamError(f"{context}[{i}] must be a transform name or a mapping with `name`, got {_show(item)}")
        get_transform(name)
        out.append((name, validate_transform_params(name, params)))
    return out


# ----------------------------------------------------------------------------------------------
# what studies, search and help read


@dataclass(frozen=True)
class StudyRow:
    """One row of a merge study: `key` names it in results ("task_arithmetic_fixed"), `search`
    says whether coefficients are searched on validation, `fixed` are the params pinned for it."""

    key: str
    method: str
    search: bool
    fixed: dict
    label: str
    plot_label: str
    short_label: str


def _plot_label(label: str) -> str:
    head, sep, tail = label.partition(" (")
    return f"{head}\n({tail}" if sep else label.replace(" ", "\n", 1)


def study_rows(methods: Sequence[str] | None = None, fixed_overrides: Mapping[str, Mapping] | None = None,
               num_tasks: int | None = None) -> list[StudyRow]:
    """The rows every merge study reports, in order: each study method (searched if it has a
    grid, else at its defaults), followed by its fixed-coefficient ablation if it declares one.
    `fixed_overrides` replaces a method's ablation params ({"task_arithmetic": {"scaling": 0.3}}).
    With `num_tasks`, methods that cannot merge that many models (SLERP: two) are left out."""
    rows = []
    for name in (methods if methods is not None else method_names(study_only=True, num_tasks=num_tasks)):
        m = get_method(name)
        searched = bool(m.grid())
        sym = m.param(m.linear_param).symbol if m.linear_param else None
        sym = sym or m.linear_param or "coefficients"
        label = f"{m.label} ({sym} searched)" if searched else m.label
        rows.append(StudyRow(name, name, searched, {}, label, _plot_label(label), m.short_label))
        fixed = (fixed_overrides or {}).get(name, m.fixed_ablation)
        if fixed:
            flabel = f"{m.label} ({sym} fixed)"
            rows.append(StudyRow(f"{name}_fixed", name, False, dict(fixed), flabel, _plot_label(flabel),
                                 f"{m.short_label} fix"))
    return rows


def report_coefficient(name: str, params: Mapping, num_tasks: int):
    """The `coef` a study reports for method `name` at resolved `params` (None if it has none)."""
    m = get_method(name)
    if m.coefficient is not None:
        return m.coefficient(dict(params), num_tasks)
    return params.get(m.linear_param) if m.linear_param else None


def describe(width: int = 100) -> str:
    """Methods and transforms with their parameters (for `saft-hf merge --help` and docs)."""
    lines = ["merge methods (method: NAME, params: {...}):"]
    for name in method_names():
        lines += _describe_one(get_method(name))
    lines += ["", "transforms (transforms: [{name: NAME, ...}], in front of methods that take task vectors):"]
    for name in transform_names():
        lines += _describe_one(get_transform(name))
    return "\n".join(lines)


def _describe_one(obj) -> list[str]:
    lines = [f"  {obj.name}: {obj.description}"]
    for p in obj.params:
        default = "(none)" if p.default is None else _show(p.default)
        grid = f"; search grid {list(p.grid)}" if p.grid else ""
        kind = "number or list (one per model)" if p.kind == "per_task_float" else p.kind
        if p.per_layer:
            kind += ", or per-layer rules [{pattern|glob, value}, ..., {value}]"
        lines.append(f"      {p.name} ({kind}, {p.range_text()}, default {default}{grid}): {p.help}")
    return lines
