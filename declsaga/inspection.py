"""Introspection of compiled `Saga` classes, without instantiating them.

```python
from declsaga.inspection import plan

for step in plan(PlaceOrder).steps:
    print(step.order, step.name, plan(PlaceOrder).compensators.get(step.name))
```

Each `ActionInfo.policy` (and `SagaPlan.policies`, by action name) holds the `retry=` and
`timeout=` given to `@step` or `@compensates`; `SagaPlan.deadline` is the class's
`deadline=`, its own or inherited. `SagaPlan.groups` lists the parallel groups (the
steps of one order marked `parallel=True`, by name), and `ActionInfo.parallel` marks
their members.

`plan(cls)` returns the plan the class compiled to when its class statement ran (the
same object every time), like `attrs.fields(cls)` for attrs classes.
"""

from __future__ import annotations

from ._dsl import ActionInfo, ActionKind, Saga, SagaPlan, compiled
from ._errors import UsageError, describe
from ._policies import ActionPolicy

__all__ = ["ActionInfo", "ActionKind", "ActionPolicy", "SagaPlan", "plan"]


def plan(saga_class: type[Saga]) -> SagaPlan:
    """The compiled plan of a `Saga` subclass; `UsageError` for anything else."""
    given: object = saga_class  # checked at run time too: callers may be untyped
    if not isinstance(given, type):
        if isinstance(given, Saga):
            name = type(given).__qualname__
            raise UsageError(
                f"plan() takes a Saga subclass, not an instance: write plan({name}), "
                "or plan(type(saga))."
            )
        raise UsageError(f"plan() takes a Saga subclass, got {describe(given)}.")
    if saga_class is Saga:
        raise UsageError("plan() takes a subclass of Saga, not Saga itself.")
    found = compiled(saga_class)
    if found is None:
        raise UsageError(
            f"plan() takes a Saga subclass, got the class {saga_class.__qualname__}, "
            "which is not one."
        )
    return found.plan
