"""targetsft: fine-tuning language models with designed target distributions.

Every supported loss is cross-entropy against ``Q_t = γ_t·onehot(y_t) + (1 − γ_t)·π̃_t`` (arXiv 2606.11189).
"""

from targetsft import functional
from targetsft.compute_loss import TargetLoss
from targetsft.fused import fused_target_loss
from targetsft.induced import InducedTarget, induced_target
from targetsft.loss import build_target, target_loss
from targetsft.methods import METHODS, MethodSpec, Param, get_method, methods_table, register_method
from targetsft.target import Target

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "InducedTarget",
    "MethodSpec",
    "Param",
    "Target",
    "TargetLoss",
    "build_target",
    "fused_target_loss",
    "functional",
    "get_method",
    "induced_target",
    "methods_table",
    "register_method",
    "target_loss",
]
