"""Ascend SoC families and what each NPU optimizer kernel supports on them, from CANN's documentation.

torch_npu names the chip with ``torch_npu.npu.get_device_name()`` (``"Ascend910B3"``,
``"Ascend910_9391"``, ``"Ascend950PR_957b"``, ...). The families, as CANN's product tables
and HCCL's ``SOC_VER_CONVERT`` group them:

* **Atlas training** (first generation): ``Ascend910``, ``Ascend910A``, ``Ascend910B`` (no
  digit), ``Ascend910ProA``, ``Ascend910ProB``, ``Ascend910PremiumA``;
* **Atlas A2**: ``Ascend910B1`` … ``Ascend910B4`` (and ``B2C``, ``B4-1``);
* **Atlas A3**: ``Ascend910_93xx``;
* **Ascend950**: ``Ascend950PR_*``, ``Ascend950DT_*``, ``Ascend910_95xx``;
* inference parts (``Ascend310P*``, ``Ascend310B*``).

Kernel support (hicann/ops-nn ``optim/*/docs``; op-plugin ``FusedAdamKernelNpuOpApi.cpp``):

* ``aclnnApplyAdamWV2`` (torch_npu's ``_fused_adamw_``) and ``aclnnFusedSgd``
  (``_fused_sgd_``): Atlas A2, A3 and Ascend950, in float32, float16 and bfloat16;
* ``_fused_adam_`` runs ``aclnnFusedAdam`` from Ascend950 on; below, torch_npu copies every
  tensor to the host and runs torch's CPU kernel (correct, but a host round trip per step);
* ``npu_apply_adam_w`` (``ApplyAdamW``) on every training part; bfloat16 only from Atlas A2
  on.

These tables say where a kernel may be tried; the run-time probe of
:mod:`portopt.backends.npu.step` decides whether it is used.
"""

from __future__ import annotations

import enum


class Family(enum.Enum):
    """An Ascend product family, oldest first."""

    TRAINING = "Atlas training series"
    INFERENCE = "Atlas inference series"
    A2 = "Atlas A2"
    A3 = "Atlas A3"
    ASCEND950 = "Ascend950"


FROM_A2 = frozenset({Family.A2, Family.A3, Family.ASCEND950})
"""Where ``aclnnApplyAdamWV2`` and ``aclnnFusedSgd`` run."""
TRAINING_PARTS = frozenset({Family.TRAINING, *FROM_A2})
"""Where ``ApplyAdamW`` runs."""


def family(soc: str) -> Family | None:
    """The family of the SoC called ``soc`` (torch_npu's device name), or ``None`` when unknown."""
    name = soc.strip()
    if name.startswith(("Ascend950", "Ascend910_95")):
        return Family.ASCEND950
    if name.startswith("Ascend910_93"):
        return Family.A3
    if name.startswith("Ascend910B") and len(name) > len("Ascend910B") and name[len("Ascend910B")].isdigit():
        return Family.A2
    if name.startswith("Ascend910"):
        return Family.TRAINING
    if name.startswith("Ascend310"):
        return Family.INFERENCE
    return None


def supported_on(soc: str | None, families: frozenset[Family], what: str) -> str | None:
    """``None`` if ``what`` runs on ``soc``, else why not (an unknown SoC is not assumed to support it)."""
    if soc is None:
        return f"{what} needs a known SoC ({', '.join(sorted(f.value for f in families))}); the SoC is unknown"
    found = family(soc)
    if found in families:
        return None
    where = found.value if found is not None else "an unrecognised SoC"
    return f"{what} runs on {', '.join(sorted(f.value for f in families))}, not on {soc} ({where})"
