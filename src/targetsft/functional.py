"""Building blocks to compose new targets without touching the library.

A target is a label-trust rule (``γ``) and a residual (``π̃``)::

    from targetsft import functional as TF
    confident_teacher = TF.Target(trust=TF.trust.LabelProb(2.0), residual=TF.residual.Guided(eta=0.3))
    loss = targetsft.target_loss(logits, labels, method=confident_teacher, teacher_logits=t)

Any callable with a ``needs`` attribute that maps a :class:`TokenState` to ``γ`` ``[n]`` (or to a
:class:`Residual`) works as a rule.
"""

from targetsft.losses import residual, trust
from targetsft.losses.target import Distribution, Residual, Target, TokenState

__all__ = ["Distribution", "Residual", "Target", "TokenState", "residual", "trust"]
