"""The DAPO training loop and what it orchestrates: rollouts, batches, checkpoints."""
