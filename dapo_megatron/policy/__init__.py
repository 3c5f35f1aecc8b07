"""Megatron-Core integration: log-probs, loss, train step."""
