"""The training application: train loop, evaluation, commands, ablation, synthetic data."""
