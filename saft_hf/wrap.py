"""Put SAFT's SAM / ASAM step into any `transformers.Trainer` subclass and its config class.

    from saft_hf import with_sam, with_sam_args

    MyConfig = with_sam_args(MyTrainingArguments)   # adds the sam_* fields (a dataclass subclass)
    MyTrainer = with_sam(MyTrainerClass, MyConfig)   # SAFTTrainerMixin in front of MyTrainerClass

`with_sam(TrainerClass)` returns `SAFT<Name>(SAFTTrainerMixin, TrainerClass)` plus two thin
adapters that are invisible to users:

- the constructor accepts exactly the trainer's own signature (e.g. `DPOTrainer(model, ref_model,
  args, ...)`, where `args` is not the second parameter as it is for `Trainer`): the call is bound
  to that signature and forwarded by keyword, so the mixin always sees the real `args`;
- state that the trainer updates inside `compute_loss` once per micro-batch (TRL's `_metrics` and
  token counter, see `SAMTrainerAdapter.sam_first_pass_only_state`) is kept from the first pass at
  w and the second pass's update is dropped, so SAM does not count every micro-batch twice.

The SAM step itself is `SAFTTrainerMixin.training_step`: one call of the trainer's own
`compute_loss` at w (first pass) and the parent's `training_step` at w + e (second pass), so the
trainer's own loss (SFT, DPO, ...) is what both passes differentiate.

Generated classes are registered so that pickling works (the Trainer saves its arguments with
`torch.save`): pass `module=__name__` to publish them in your own module, otherwise they live in
`saft_hf.wrap.generated`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
import types
from typing import Any

from transformers import Trainer, TrainingArguments

from .args import SharpnessArgumentsMixin
from .trainer import SAFTTrainerMixin

# Namespace of the classes generated without `module=`: pickle finds them as saft_hf.wrap.generated.<Name>.
generated = types.SimpleNamespace()
_CACHE: dict[tuple, type] = {}


def _publish(cls: type, name: str, module: str | None) -> type:
    """Give `cls` a module/qualname under which pickle (and users) can find it."""
    if module is None:
        cls.__module__ = __name__
        cls.__qualname__ = f"generated.{name}"
        setattr(generated, name, cls)
    else:
        cls.__module__ = module
        cls.__qualname__ = name
        target = sys.modules.get(module)
        if target is not None and not hasattr(target, name):
            setattr(target, name, cls)
    return cls


def _unique_name(name: str, module: str | None) -> str:
    if module is not None:
        return name
    candidate, i = name, 2
    while hasattr(generated, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def with_sam_args(config_class: type, *, name: str | None = None, module: str | None = None) -> type:
    """`SAFT<Name>`: a dataclass subclass of `config_class` with SAFT's `sam_*` fields.

    The fields come from `SharpnessArgumentsMixin`, exactly as in `SAFTTrainingArguments`, so
    `HfArgumentParser` (command line, JSON, YAML) sees them and `__post_init__` validates them.
    Returns `config_class` itself if it already has them. Calls with the same arguments return the
    same class.
    """
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        raise TypeError(
            f"with_sam_args needs a dataclass type such as transformers.TrainingArguments or trl.SFTConfig, got "
            f"{config_class!r}."
        )
    if not issubclass(config_class, TrainingArguments):
        raise TypeError(
            f"with_sam_args needs a subclass of transformers.TrainingArguments (the sam_* validation runs in its "
            f"__post_init__), got {config_class.__name__}."
        )
    if issubclass(config_class, SharpnessArgumentsMixin):
        return config_class
    key = (config_class, "args", module, name)
    if key in _CACHE:
        return _CACHE[key]
    final_name = _unique_name(name or f"SAFT{config_class.__name__}", module)
    namespace = {
        "__doc__": f"`{config_class.__name__}` plus SAFT's SAM / ASAM knobs (`sam_*`).",
        "__module__": module or __name__,
    }
    cls = dataclasses.dataclass(type(final_name, (SharpnessArgumentsMixin, config_class), namespace))
    _CACHE[key] = _publish(cls, final_name, module)
    return _CACHE[key]


def _signature_owner(trainer_class: type) -> type:
    """The first class in the MRO whose `__init__` has a named `args` parameter (skips `*args, **kwargs`)."""
    for klass in trainer_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and _has_named_args(inspect.signature(init)):
            return klass
    return Trainer


def _has_named_args(signature: inspect.Signature) -> bool:
    param = signature.parameters.get("args")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _named_signature(trainer_class: type) -> inspect.Signature:
    """The signature users call the trainer with (see `_signature_owner`)."""
    return inspect.signature(_signature_owner(trainer_class).__init__)


class SAMTrainerAdapter:
    """Sits between `SAFTTrainerMixin` and the wrapped trainer in `with_sam`'s classes (see the module doc)."""

    # Attributes the trainer updates in `compute_loss` once per micro-batch (TRL trainers: logged metrics and the
    # token counter). Under SAM, compute_loss runs twice per micro-batch; the values after the first pass (at w,
    # whose loss is the logged `loss`) are kept and the second pass's updates dropped. Missing attributes are skipped.
    sam_first_pass_only_state: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    _sam_takes_model: bool = True  # whether the wrapped trainer's constructor has a `model` parameter

    def __init__(self, model=None, args=None, *positional, **kwargs):
        if positional:
            raise TypeError(
                f"{type(self).__name__}: internal error, positional arguments {positional!r} reached the adapter; "
                "construct the trainer through the class returned by saft_hf.with_sam."
            )
        if self._sam_takes_model:
            kwargs["model"] = model
        super().__init__(args=args, **kwargs)

    def training_step(self, *args, **kwargs):
        # The mixin calls the parent's training_step only for its second (perturbed) pass when SAM is on.
        if not self.sam_enabled:
            return super().training_step(*args, **kwargs)
        saved = {n: copy.deepcopy(getattr(self, n)) for n in self.sam_first_pass_only_state if hasattr(self, n)}
        try:
            return super().training_step(*args, **kwargs)
        finally:
            for attr, value in saved.items():
                setattr(self, attr, value)


def with_sam(
    trainer_class: type,
    args_class: type | None = None,
    *,
    name: str | None = None,
    module: str | None = None,
) -> type:
    """`SAFT<Name>`: `trainer_class` with SAFT's SAM / ASAM two-pass step in `training_step`.

    `args_class` is the config class the trainer builds when called without `args` and names in its
    errors; default: `with_sam_args` of the config class `trainer_class` documents (its `args`
    annotation), else `SAFTTrainingArguments`. The returned trainer requires arguments that carry
    the `sam_*` fields (`with_sam_args(YourConfig)(...)`).
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_sam needs a subclass of transformers.Trainer, got {trainer_class!r}.")
    if issubclass(trainer_class, SAFTTrainerMixin):
        return trainer_class
    signature = _named_signature(trainer_class)
    if args_class is None:
        args_class = _default_args_class(signature, _signature_owner(trainer_class))
    elif not (isinstance(args_class, type) and issubclass(args_class, SharpnessArgumentsMixin)):
        raise TypeError(
            f"args_class must carry the sam_* fields: pass with_sam_args({getattr(args_class, '__name__', args_class)})"
            f" instead of {getattr(args_class, '__name__', args_class)}."
        )
    key = (trainer_class, args_class, module, name)
    if key in _CACHE:
        return _CACHE[key]
    self_name = next(iter(signature.parameters))

    def __init__(self, *call_args: Any, **call_kwargs: Any):
        try:
            bound = signature.bind_partial(self, *call_args, **call_kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}{signature}: {err}") from None
        arguments = dict(bound.arguments)
        arguments.pop(self_name)
        extra = {}
        for pname, param in signature.parameters.items():
            if pname in arguments and param.kind is inspect.Parameter.VAR_KEYWORD:
                extra = arguments.pop(pname)
            elif pname in arguments and param.kind is inspect.Parameter.VAR_POSITIONAL:
                if arguments.pop(pname):
                    raise TypeError(f"{type(self).__name__} got too many positional arguments.")
        model = arguments.pop("model", None)
        args = arguments.pop("args", None)
        SAFTTrainerMixin.__init__(self, model, args, **arguments, **extra)

    final_name = _unique_name(name or f"SAFT{trainer_class.__name__}", module)
    namespace = {
        "__init__": __init__,
        "_args_class": args_class,
        "_sam_takes_model": "model" in signature.parameters,
        "__module__": module or __name__,
        "__doc__": f"`{trainer_class.__name__}` with SAFT's SAM / ASAM step (configure with `{args_class.__name__}`).",
    }
    cls = type(final_name, (SAFTTrainerMixin, SAMTrainerAdapter, trainer_class), namespace)
    cls.__init__.__signature__ = signature
    _CACHE[key] = _publish(cls, final_name, module)
    return _CACHE[key]


def _default_args_class(signature: inspect.Signature, owner: type) -> type:
    from .args import SAFTTrainingArguments

    annotation = signature.parameters["args"].annotation if "args" in signature.parameters else None
    if isinstance(annotation, str):  # postponed annotations (`from __future__ import annotations`)
        try:
            annotation = eval(annotation, vars(sys.modules[owner.__module__]))  # noqa: S307 - the class's own module
        except Exception:
            return SAFTTrainingArguments
    if annotation is None or annotation is inspect.Parameter.empty:
        return SAFTTrainingArguments
    candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
    for candidate in candidates:
        if issubclass(candidate, TrainingArguments) and candidate is not TrainingArguments:
            return with_sam_args(candidate)
    return SAFTTrainingArguments
