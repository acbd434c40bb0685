"""The loss layer (functional → module): targets ``Q = γ·onehot(y) + (1 − γ)·π̃`` and the losses against them.

Imports nothing of targetsft outside this package. :mod:`~targetsft.losses.target` (the structured target and its
one kernel), :mod:`~targetsft.losses.trust` / :mod:`~targetsft.losses.residual` (γ and π̃ rules),
:mod:`~targetsft.losses.methods` (the registry), :mod:`~targetsft.losses.loss` (``target_loss``, ``build_target``
on logits), :mod:`~targetsft.losses.fused` (lm_head + loss in chunks), :mod:`~targetsft.losses.induced` (the
target any loss induces), :mod:`~targetsft.losses.inputs` / :mod:`~targetsft.losses.validation` (input checks).
"""
