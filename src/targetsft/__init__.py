"""targetsft: fine-tuning language models with designed target distributions.

Every supported loss is cross-entropy against ``Q_t = γ_t·onehot(y_t) + (1 − γ_t)·π̃_t`` (arXiv 2606.11189).
"""

from targetsft import _compat, functional
from targetsft.losses.distributions import Chunking, LMHead, Logits, Projected, TopK
from targetsft.losses.fused import fused_target_loss
from targetsft.losses.induced import InducedTarget, induced_target
from targetsft.losses.loss import build_target, target_loss
from targetsft.losses.methods import METHODS, MethodSpec, Param, get_method, methods_table, register_method
from targetsft.losses.target import Target
from targetsft.training.loss_func import TargetLoss

__version__ = "0.2.0"

_compat.install()

__all__ = [
    "METHODS",
    "Chunking",
    "InducedTarget",
    "LMHead",
    "Logits",
    "MethodSpec",
    "Param",
    "Projected",
    "Target",
    "TargetLoss",
    "TopK",
    "build_target",
    "fused_target_loss",
    "functional",
    "get_method",
    "induced_target",
    "methods_table",
    "register_method",
    "target_loss",
]
