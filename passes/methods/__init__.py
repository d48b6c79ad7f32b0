"""Training methods that choose sparsity masks: magnitude (baseline), PDP, GaP, StructADMM.

Each is a `Method` (see base.py) built as Method(weights, infos, pattern, sparsity, total_steps,
analysis=..., scope=..., **opts) and trained with `train.run`.
"""

from onnx_prune.passes.methods.admm import ADMM
from onnx_prune.passes.methods.base import Method
from onnx_prune.passes.methods.gap import GaP
from onnx_prune.passes.methods.magnitude import Magnitude
from onnx_prune.passes.methods.pdp import PDP

METHODS = {"magnitude": Magnitude, "pdp": PDP, "gap": GaP, "admm": ADMM}


def make(name: str, *args, **kw) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (choose: {', '.join(METHODS)})")
    return METHODS[name](*args, **kw)


__all__ = ["ADMM", "GaP", "Magnitude", "METHODS", "Method", "PDP", "make"]
