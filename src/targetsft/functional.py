"""Building blocks to compose new targets without touching the library.

A target is a label-trust rule (``γ``) and a residual (``π̃``)::

    from targetsft import functional as TF
    confident_teacher = TF.Target(trust=TF.trust.LabelProb(2.0), residual=TF.residual.Guided(eta=0.3))
    loss = targetsft.target_loss(logits, labels, method=confident_teacher, teacher=TF.Logits(t))

Any callable with a ``needs`` attribute that maps a :class:`TokenState` to ``γ`` ``[n]`` (or to a
:class:`Residual`) works as a rule.

The teacher and reference reach a loss as one typed value each (:class:`TopK`, :class:`Logits`, :class:`Projected`),
the student's output projection of the fused loss as an :class:`LMHead`.
"""

from targetsft.losses import residual, trust
from targetsft.losses.distributions import Chunking, LMHead, Logits, Projected, TopK
from targetsft.losses.target import Distribution, Residual, Target, TokenState

__all__ = [
    "Chunking",
    "Distribution",
    "LMHead",
    "Logits",
    "Projected",
    "Residual",
    "Target",
    "TokenState",
    "TopK",
    "residual",
    "trust",
]
