"""Drive an exported portopt step with onnxruntime and numpy alone (run as a script, never imported).

    python onnx_standalone_driver.py STEP.onnx INIT.onnx DATA.npz OUT.npz

``DATA.npz`` holds ``param`` (the initial parameter), ``grads`` (one gradient per step) and
``hyper_<name>`` for each hyperparameter; ``OUT.npz`` receives the parameter and every state
after each step. The states start from the init model. Nothing of portopt or torch is imported:
the script checks so before it writes its result.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort


def main(step_path: str, init_path: str, data_path: str, out_path: str) -> None:
    data = np.load(data_path)
    step = ort.InferenceSession(step_path, providers=["CPUExecutionProvider"])
    init = ort.InferenceSession(init_path, providers=["CPUExecutionProvider"])
    hypers = {k[len("hyper_") :]: np.asarray(data[k], dtype=np.float32) for k in data.files if k.startswith("hyper_")}
    param = data["param"].astype(np.float32)
    grads = data["grads"].astype(np.float32)

    init_names = [o.name for o in init.get_outputs()]
    first = {i.name: None for i in init.get_inputs()}
    feeds = {"param": param, "grad": grads[0], **{k: v for k, v in hypers.items() if k in first}}
    states = {name[: -len("_init")]: value for name, value in zip(init_names, init.run(None, feeds), strict=True)}

    outputs = [o.name for o in step.get_outputs()]
    history: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for t, grad in enumerate(grads, start=1):
        feeds = {"param": param, "grad": grad, "step": np.asarray(t, dtype=np.float32), **states, **hypers}
        results = dict(zip(outputs, step.run(None, feeds), strict=True))
        param = results["param_out"]
        states = {name: results[name + "_out"] for name in states}
        for name in outputs:
            history[name].append(results[name])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("portopt", "torch"))
    if leaked:
        raise SystemExit(f"the driver must run on onnxruntime alone, but imported {leaked[:5]}")
    stacked: dict[str, np.ndarray] = {name: np.stack(values) for name, values in history.items()}
    np.savez(out_path, **stacked)  # type: ignore[arg-type]


if __name__ == "__main__":
    main(*sys.argv[1:5])
