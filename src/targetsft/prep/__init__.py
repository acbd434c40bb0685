"""The data-preparation layer: training records written with per-token or per-record weights from a model's scores,
the critical tokens of solutions by counterfactual rollouts (:mod:`~targetsft.prep.critical_tokens`,
``target-sft mark-critical``) and iw-SFT's trajectory weights (:mod:`~targetsft.prep.importance_weights`,
``target-sft importance-weights``). Imports the training, evaluation, data and runtime layers."""
