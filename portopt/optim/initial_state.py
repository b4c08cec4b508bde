"""States created before a parameter's first step (torch.optim.Adagrad's eager states, sparse rows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from portopt.lowering.backend import step_counter_dtype
from portopt.optim import amp
from portopt.optim.groups import group_hypers
from portopt.precision.policy import PolicyError
from portopt.spec.definition import Spec
from portopt.spec.ops import Op
from portopt.spec.symbols import Layout


def eager_state(spec: Spec, group: Mapping[str, Any], param: Tensor) -> dict[str, Tensor]:
    """States before any step, as torch.optim.Adagrad creates them (``step`` = 0), stored as the
    group's precision policy says.

    Only for specs whose initial states are constants or hyperparameters. A complex parameter's
    state is complex with the value in both parts (``complex(v, v)``, as torch.optim.Adagrad:
    each part of ``torch.view_as_real`` starts at ``v``).
    """
    hypers = group_hypers(spec, group)
    values: dict[str, float] = {}
    for decl in spec.states:
        init = decl.init
        if init.op is Op.CONST:
            values[decl.name] = float(init.value or 0.0)
        elif init.op is Op.HYPER:
            values[decl.name] = float(hypers[str(init.value)])
        else:
            raise ValueError(f"{spec.name}: state {decl.name!r} starts from p or g and cannot be created before a step")
        if decl.layout is not Layout.ELEMENTWISE:
            raise ValueError(f"{spec.name}: eager creation supports element-wise states, not {decl.name!r}")
    policy = amp.resolve(group.get("precision"))
    if policy is not amp.DEFAULT:
        if param.is_complex():
            raise PolicyError(
                f"{spec.name}: complex parameters are stepped as stored; precision={group.get('precision')!r} "
                "is not supported for them (use precision=None)"
            )
        return amp.eager_state(spec, policy, values, param)
    state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=step_counter_dtype())}
    for name, value in values.items():
        fill = complex(value, value) if param.is_complex() else value
        state[name] = torch.full_like(param, fill, memory_format=torch.preserve_format).detach()
    return state
