"""Ascend NPU backends: the spec lowered to Ascend's fused optimizer ops, loss scaling done by portopt.

Two backends share one rule (:mod:`portopt.backends.npu.step`) and differ only in their op
table (:mod:`portopt.backends.npu.ops`):

* ``npu``: NPU tensors, torch_npu's ops. Every spec is served: a spec that the equivalence
  proof binds to an NPU kernel (:mod:`portopt.backends.npu.kernels`: an AdamW to torch_npu's
  ``_fused_adamw_`` or ``npu_apply_adam_w``, an Adam to ``_fused_adam_``, an SGD with
  momentum to ``_fused_sgd_``) runs on that kernel where the installed torch_npu registers
  it and the SoC and dtype allow (:mod:`portopt.backends.npu.soc`); everything else runs
  on the generic lowering on the ``npu`` device. ``backend="auto"`` takes it for NPU
  parameters.
* ``npu-contract``: CPU tensors, the ops of the module named by ``PORTOPT_NPU_OPS``
  (default :mod:`portopt.backends.npu_emulation`, an emulation of the ops written from their
  documented semantics). It makes the ``npu`` backend's choices (a kernel, or the generic
  lowering and why: :attr:`NpuStep.last_choice <portopt.backends.npu.step.NpuStep.last_choice>`),
  is reachable by name only, and every report calls it an emulation: it proves the rules'
  conventions (beta powers ``β^(t−1)``, ``step − 1``, loss scaling, dtype and SoC limits),
  not the silicon.

torch_npu is imported lazily, on the first look at the ``npu`` backend's availability or
kernels; a missing or broken install makes ``npu`` unavailable with the reason and leaves
everything else working.

Facts this package is built on (read from the sources, not copied): Ascend/op-plugin
``op_plugin/ops/opapi/ApplyAdamWKernelNpuOpApi.cpp``, ``FusedAdamWKernelNpuOpApi.cpp``,
``FusedAdamKernelNpuOpApi.cpp`` and the ``_fused_sgd_`` kernel; CANN's ``aclnnApplyAdamW``,
``aclnnApplyAdamWV2`` and ``aclnnFusedSgd`` documentation (hicann/ops-nn ``optim/``); the
details are in :mod:`portopt.backends.npu_emulation`.
"""

from __future__ import annotations

from portopt.backends.npu.kernels import match_kernels
from portopt.backends.npu.ops import contract_ops, contract_unavailable_reason, hardware_ops
from portopt.backends.npu.step import NpuStep
from portopt.lowering.backend import Backend
from portopt.lowering.registry import register_backend
from portopt.spec.definition import Spec

NAME = "npu"
CONTRACT_NAME = "npu-contract"
PRIORITY = 30
CONTRACT_LABEL = "emulated Ascend ops on CPU, not hardware"


def _hardware_unavailable_reason() -> str | None:
    ops = hardware_ops()
    return ops if isinstance(ops, str) else None


def build_npu_step(spec: Spec) -> NpuStep:
    """The ``npu`` backend's step for ``spec``: its NPU kernels where they apply, else the generic lowering."""
    return NpuStep(spec, match_kernels(spec), hardware_ops, "npu")


def build_contract_step(spec: Spec) -> NpuStep:
    """The ``npu-contract`` step for ``spec``: the ``npu`` backend's rule on CPU tensors, through the op contract."""
    return NpuStep(spec, match_kernels(spec), contract_ops, "cpu")


NPU = register_backend(
    Backend(
        name=NAME,
        summary=(
            "Ascend NPU: torch_npu's fused optimizer ops (_fused_adamw_, npu_apply_adam_w, _fused_adam_, "
            "_fused_sgd_) for specs proven equivalent to one, loss scaling done by portopt; the generic "
            "lowering on the npu device for the rest"
        ),
        device_types=("npu",),
        build=build_npu_step,
        unavailable_reason=_hardware_unavailable_reason,
        priority=PRIORITY,
    )
)

NPU_CONTRACT = register_backend(
    Backend(
        name=CONTRACT_NAME,
        summary=(
            "the npu backend's rule (kernel or generic lowering) on CPU tensors, through the op module "
            "PORTOPT_NPU_OPS names (default portopt.backends.npu_emulation): an op-contract emulation, not hardware"
        ),
        device_types=("cpu",),
        build=build_contract_step,
        unavailable_reason=contract_unavailable_reason,
        priority=0,
        auto_select=False,
        label=CONTRACT_LABEL,
    )
)

__all__ = ["CONTRACT_NAME", "NAME", "NPU", "NPU_CONTRACT", "build_contract_step", "build_npu_step"]
