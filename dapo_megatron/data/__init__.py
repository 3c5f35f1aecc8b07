"""Prompt data: DAPO-Math-17k schema loading/tokenisation, the resumable sampler, the demo task."""
