"""The training layer (integration): configs, ``TargetTrainer`` on ``transformers.Trainer``, the model hooks of the
fused loss, TRL's ``compute_loss_func`` and the teacher top-k cache. Imports the loss, data and runtime layers."""
