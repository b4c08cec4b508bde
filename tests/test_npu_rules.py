"""The NPU rules on CPU through the op contract: kernels found by proof, conventions, choices, the op table.

Everything here runs the ``npu`` backend's rule code with the ops of the module that
``PORTOPT_NPU_OPS`` names (the emulation of torch_npu's ops, or a spy around it), on CPU
tensors: an op-contract test, not hardware (tests/test_npu_hardware.py is).

* Recognition: the equivalence proof binds AdamW to ``_fused_adamw_`` and
  ``npu_apply_adam_w``, AMSGrad-AdamW only to ``_fused_adamw_`` (``npu_apply_adam_w`` keeps
  the maximum in ``v``), Adam to ``_fused_adam_``, SGD with momentum to ``_fused_sgd_``; a
  renamed AdamW with other state names is found, a near miss is not.
* Conventions: the rule's steps agree with the float64 reference for many steps (beta
  powers, step − 1, first momentum step).
* Choices: the kernel (or the generic lowering, with the reason) follows the op table, the
  SoC, the dtype and the hyperparameter values; a kernel whose probe disagrees with its
  spec is not used.
* The op table: ``PORTOPT_NPU_OPS`` swaps it; a bad value is an error naming the variable.
* Loss scaling: the rule never hands GradScaler's tensors to an op, and honours them itself.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from portopt import backends
from portopt.algorithms import get_spec
from portopt.backends import npu_emulation
from portopt.backends.npu import build_contract_step
from portopt.backends.npu.kernels import match_kernels, no_match_reason
from portopt.backends.npu.ops import OPS_VARIABLE, NpuOpsError, contract_ops
from portopt.backends.reference import build_reference_step
from portopt.lowering.backend import ParamState
from portopt.spec import G, P, Spec, StateDecl, T, hyper, sqrt, state
from portopt.spec.symbols import NON_NEGATIVE, UNIT_INTERVAL_OPEN_RIGHT, Hyperparameter

SPY = "portopt_test_npu_spy_ops"


class Spy:
    """An op module around the emulation that records which op ran and with which GradScaler arguments."""

    def __init__(self, drop: tuple[str, ...] = (), replace: dict[str, Callable[..., Any]] | None = None) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.module = types.ModuleType(SPY)
        self.module.soc_name = npu_emulation.soc_name  # type: ignore[attr-defined]
        for name in ("npu_apply_adam_w", "_fused_adamw_", "_fused_adam_", "_fused_sgd_"):
            if name in drop:
                continue
            setattr(self.module, name, self._wrap(name, (replace or {}).get(name, getattr(npu_emulation, name))))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs.get("grad_scale"), kwargs.get("found_inf")))
            return fn(*args, **kwargs)

        return op

    def ops(self) -> list[str]:
        return [name for name, _, _ in self.calls]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Spy]:
    def install(drop: tuple[str, ...] = (), replace: dict[str, Callable[..., Any]] | None = None) -> Spy:
        made = Spy(drop, replace)
        monkeypatch.setitem(sys.modules, SPY, made.module)
        monkeypatch.setenv(OPS_VARIABLE, SPY)
        return made

    return install


def problem(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Three parameters of odd sizes (one 0-d) and eight steps of gradients."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (13,), ()]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(8)]
    return params, grads


def run(step: Callable[..., None], params: list[Tensor], grads: list[list[Tensor]], hypers: dict[str, float]):
    params = [p.clone() for p in params]
    states: list[ParamState] = [{} for _ in params]
    for g in grads:
        step(params, [x.clone() for x in g], states, hypers)
    return params, states


# --------------------------------------------------------------------------------------
# Recognition by proof.


def titles(spec: Spec) -> list[str]:
    return [m.kernel.name for m in match_kernels(spec)]


def test_library_specs_reach_their_npu_kernels() -> None:
    assert titles(get_spec("adamw")) == [
        "torch_npu _fused_adamw_(amsgrad=False, maximize=False)",
        "torch_npu.npu_apply_adam_w(amsgrad=False, maximize=False)",
    ]
    assert titles(get_spec("adamw").maximized())[1] == "torch_npu.npu_apply_adam_w(amsgrad=False, maximize=True)"
    assert titles(get_spec("adamw", amsgrad=True)) == ["torch_npu _fused_adamw_(amsgrad=True, maximize=False)"]
    assert titles(get_spec("adam")) == ["torch_npu _fused_adam_(amsgrad=False, maximize=False)"]
    assert titles(get_spec("sgd", momentum=True, nesterov=True)) == [
        "torch_npu _fused_sgd_(nesterov=True, maximize=False)"
    ]
    for name in ("sgd", "lion", "nadam", "adagrad"):
        assert titles(get_spec(name)) == [], name


def test_npu_apply_adam_w_amsgrad_is_not_torchs_amsgrad() -> None:
    """aclnnApplyAdamW keeps max(max_grad_norm, v) in v: the proof refuses it for torch's AMSGrad, and says where."""
    from portopt.backends.npu.kernels import NEUTRAL, apply_adam_w_spec
    from portopt.lowering.equivalence import find_binding

    binding, why = find_binding(
        get_spec("adamw", amsgrad=True), apply_adam_w_spec(amsgrad=True, maximize=False), NEUTRAL
    )
    assert binding is None
    assert "differs" in why


def adamw_from_scratch(*, eps_inside_sqrt: bool = False) -> Spec:
    """AdamW written another way: other names, lerp-style moment, bias corrections folded together."""
    lr, b1, b2, eps, wd = (hyper(n) for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    mu = state("first") + (1 - b1) * (G - state("first"))
    nu = b2 * state("second") + (1 - b2) * G * G
    nu_hat = nu / (1 - b2**T)
    denom = sqrt(nu_hat + eps) if eps_inside_sqrt else sqrt(nu_hat) + eps
    return Spec(
        name="my_adamw",
        title="AdamW, mine",
        hyperparameters=(
            Hyperparameter("lr", 1e-3, NON_NEGATIVE),
            Hyperparameter("beta1", 0.9, UNIT_INTERVAL_OPEN_RIGHT),
            Hyperparameter("beta2", 0.999, UNIT_INTERVAL_OPEN_RIGHT),
            Hyperparameter("eps", 1e-8, NON_NEGATIVE),
            Hyperparameter("weight_decay", 1e-2, NON_NEGATIVE),
        ),
        states=(StateDecl("second", "s"), StateDecl("first", "f")),
        updates=(("first", mu), ("second", nu)),
        param_update=P - lr * wd * P - lr * (mu / (1 - b1**T)) / denom,
    )


def test_kernels_are_found_by_proof_not_by_name() -> None:
    mine = match_kernels(adamw_from_scratch())
    assert [m.kernel.op for m in mine] == ["_fused_adamw_", "npu_apply_adam_w"]
    assert dict(mine[0].binding.states) == {"exp_avg": "first", "exp_avg_sq": "second"}
    assert match_kernels(adamw_from_scratch(eps_inside_sqrt=True)) == ()
    reason = no_match_reason(adamw_from_scratch(eps_inside_sqrt=True))
    assert reason is not None
    assert "differs" in reason


# --------------------------------------------------------------------------------------
# Conventions: the rule's steps against the float64 reference.

CASES = [
    ("adamw", {}, False, {"lr": 0.01, "weight_decay": 0.1}, "_fused_adamw_"),
    ("adamw", {"amsgrad": True}, True, {"lr": 0.01, "weight_decay": 0.1, "eps": 1e-3}, "_fused_adamw_"),
    ("adam", {}, False, {"lr": 0.01, "weight_decay": 0.1}, "_fused_adam_"),
    (
        "sgd",
        {"momentum": True, "nesterov": True},
        False,
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        "_fused_sgd_",
    ),
    ("sgd", {"momentum": True}, True, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}, "_fused_sgd_"),
]


@pytest.mark.parametrize(("name", "options", "maximize", "values", "op"), CASES)
def test_rule_steps_agree_with_the_reference(spy, name, options, maximize, values, op) -> None:
    ops = spy()
    spec = get_spec(name, **options)
    spec = spec.maximized() if maximize else spec
    hypers = {**spec.defaults(), **values}
    params, grads = problem()
    got, got_states = run(build_contract_step(spec), params, grads, hypers)
    want, want_states = run(
        build_reference_step(spec), [p.double() for p in params], [[g.double() for g in s] for s in grads], hypers
    )
    assert set(ops.ops()) == {op}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-6)
    for gs, ws in zip(got_states, want_states, strict=True):
        assert float(gs["step"]) == float(ws["step"]) == len(grads)
        for key in spec.state_names:
            torch.testing.assert_close(gs[key].double(), ws[key], rtol=2e-5, atol=2e-6)


def test_npu_apply_adam_w_path_agrees_with_the_reference(spy) -> None:
    """An op table without _fused_adamw_ (torch_npu < 2.8): AdamW runs on npu_apply_adam_w and its beta powers."""
    ops = spy(drop=("_fused_adamw_",))
    spec = get_spec("adamw")
    hypers = {**spec.defaults(), "lr": 0.01, "weight_decay": 0.1}
    params, grads = problem()
    got, _ = run(build_contract_step(spec), params, grads, hypers)
    want, _ = run(
        build_reference_step(spec), [p.double() for p in params], [[g.double() for g in s] for s in grads], hypers
    )
    assert set(ops.ops()) == {"npu_apply_adam_w"}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------------
# Choices: op table, SoC, dtype, hyperparameter values, probes.


def one_step(spec: Spec, dtype: torch.dtype, **values: float) -> str:
    step = build_contract_step(spec)
    params, grads = problem(dtype)
    run(step, params, grads[:2], {**spec.defaults(), **values})
    assert step.last_choice is not None
    return step.last_choice


@pytest.mark.parametrize(
    ("soc", "name", "dtype", "expected"),
    [
        ("Ascend910B3", "adamw", torch.bfloat16, "_fused_adamw_"),
        ("Ascend910B3", "adam", torch.float32, "generic lowering: _fused_adam_: below Ascend950 torch_npu runs"),
        ("Ascend910A", "adamw", torch.float32, "npu_apply_adam_w"),
        ("Ascend910A", "adamw", torch.bfloat16, "npu_apply_adam_w: npu_apply_adam_w rounds lr"),
        ("Ascend950PR", "adam", torch.float16, "_fused_adam_"),
        ("Ascend950PR", "adamw", torch.float64, "generic lowering: _fused_adamw_: _fused_adamw_ takes"),
    ],
)
def test_the_kernel_follows_the_soc_and_the_dtype(monkeypatch, soc, name, dtype, expected) -> None:
    monkeypatch.setenv(npu_emulation.SOC_VARIABLE, soc)
    monkeypatch.delenv(OPS_VARIABLE, raising=False)
    assert expected in one_step(get_spec(name), dtype)


def test_hyperparameter_values_the_kernel_refuses_run_generic(spy) -> None:
    ops = spy()
    choice = one_step(get_spec("sgd", momentum=True), torch.float32, lr=0.1, momentum=0.0)
    assert "refuses momentum <= 0" in choice
    assert ops.calls == []


def test_a_kernel_that_disagrees_with_its_spec_is_not_used(spy) -> None:
    """An op table whose _fused_adamw_ forgets the weight decay: its probe fails, the rule runs npu_apply_adam_w."""

    def no_decay(*args: Any, **kwargs: Any) -> None:
        npu_emulation._fused_adamw_(*args, **{**kwargs, "weight_decay": 0.0})

    ops = spy(replace={"_fused_adamw_": no_decay})
    assert "npu_apply_adam_w" in one_step(get_spec("adamw"), torch.float32, weight_decay=0.1)
    calls = ops.ops()
    assert calls[0] == "_fused_adamw_"
    assert "_fused_adamw_" not in calls[1:], "only its probe ran it"


# --------------------------------------------------------------------------------------
# The op table.


def test_the_default_op_table_is_the_emulation(monkeypatch) -> None:
    monkeypatch.delenv(OPS_VARIABLE, raising=False)
    table = contract_ops()
    assert table.source == "portopt.backends.npu_emulation"
    assert table.emulated
    assert table.op("_fused_adamw_") is npu_emulation._fused_adamw_


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("no_such_package.ops", "cannot import it"),
        ("not a module!", "is not a module name"),
        ("math", "has none of the ops"),
    ],
)
def test_a_bad_ops_module_is_an_error_naming_the_variable(monkeypatch, value, message) -> None:
    monkeypatch.setenv(OPS_VARIABLE, value)
    with pytest.raises(NpuOpsError, match=f"{OPS_VARIABLE}=.*{message}"):
        contract_ops()
    rows = {r.name: r for r in backends.available()}
    assert not rows["npu-contract"].usable
    assert OPS_VARIABLE in rows["npu-contract"].reason
    with pytest.raises(ValueError, match=OPS_VARIABLE):
        backends.select_backend("cpu", "npu-contract", get_spec("adamw"))


def test_npu_backend_without_torch_npu_says_why() -> None:
    rows = {r.name: r for r in backends.available()}
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        assert rows["npu"].usable is False
        assert rows["npu"].reason == "package torch_npu is not installed"


# --------------------------------------------------------------------------------------
# Loss scaling in the rule.


def test_the_rule_skips_on_found_inf_and_unscales_itself(spy) -> None:
    ops = spy()
    spec = get_spec("adamw")
    hypers = {**spec.defaults(), "lr": 0.01, "weight_decay": 0.1, "eps": 1e-3}
    params, grads = problem()
    step = build_contract_step(spec)
    states: list[ParamState] = [{} for _ in params]
    step(params, grads[0], states, hypers)
    before = [p.clone() for p in params], [{k: v.clone() for k, v in s.items()} for s in states]
    scaled = [g * 1024.0 for g in grads[1]]
    step(
        params,
        [g.clone() for g in scaled],
        states,
        hypers,
        grad_scale=torch.tensor(1024.0),
        found_inf=torch.tensor(1.0),
    )
    for p, saved in zip(params, before[0], strict=True):
        assert torch.equal(p, saved)
    for s, saved_state in zip(states, before[1], strict=True):
        assert all(torch.equal(s[k], saved_state[k]) for k in saved_state)
    handed = [g.clone() for g in scaled]
    step(params, handed, states, hypers, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    expected_params = [b.clone() for b in before[0]]
    expected_states = [{k: v.clone() for k, v in s.items()} for s in before[1]]
    build_contract_step(spec)(expected_params, [g.clone() for g in grads[1]], expected_states, hypers)
    for p, e in zip(params, expected_params, strict=True):
        torch.testing.assert_close(p, e, rtol=0, atol=0)
    for h, g in zip(handed, grads[1], strict=True):
        torch.testing.assert_close(h, g, rtol=0, atol=0)  # the unscaled gradient is left in place
    assert all(gs is None and fi is None for _, gs, fi in ops.calls), "no op ever sees GradScaler's tensors"


def test_an_ops_module_without_a_soc_has_no_soc_limits(spy) -> None:
    ops = spy()
    del ops.module.soc_name
    assert contract_ops().soc is None
    assert one_step(get_spec("adam"), torch.float32) == "torch_npu _fused_adam_(amsgrad=False, maximize=False)"
