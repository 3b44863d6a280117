"""The full list of arguments a class accepts, across constructors that forward `**kwargs`."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["accepted_arguments"]


def accepted_arguments(target: Any) -> dict[str, inspect.Parameter]:
    """Every argument `target(...)` accepts, by name, in declaration order.

    For a class whose constructor forwards `**kwargs` to its parent's (the learners do:
    `MetaSGD(model, **kwargs)`), the parent's arguments are included, so the result is the
    signature a user actually calls. Arguments a class fixes by construction (its
    `fixed_arguments`, e.g. Reptile's `first_order`) are left out. A target that accepts
    arbitrary keywords to the end has a `**kwargs` entry in the result.
    """
    fixed = getattr(target, "fixed_arguments", {}) if inspect.isclass(target) else {}
    if inspect.isclass(target):
        chain = [c for c in inspect.getmro(target) if "__init__" in vars(c) and c is not object]
    else:
        chain = [target]
    out: dict[str, inspect.Parameter] = {}
    for owner in chain:
        fn = owner.__init__ if inspect.isclass(owner) else owner
        params = list(inspect.signature(fn).parameters.values())
        if inspect.isclass(owner):
            params = params[1:]  # self
        forwards = False
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in out:
                out[p.name] = p
        if not forwards:
            break
        if owner is chain[-1] or not inspect.isclass(owner):
            out["**kwargs"] = params[-1]
            break
    for name in fixed:
        out.pop(name, None)
    return out
