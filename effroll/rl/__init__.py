"""GRPO experiment: verifiable tasks (``tasks``) and TRL's GRPOTrainer with rollouts through
AdaptiveSpecRollout (``grpo``; needs the ``rl`` extra: ``pip install 'effroll[rl]'``)."""
