"""dapo_megatron.algo is pure tensor math: no process groups anywhere in it."""

from pathlib import Path

import dapo_megatron.algo


def test_no_torch_distributed_in_algo():
    root = Path(dapo_megatron.algo.__file__).parent
    offenders = [p.name for p in sorted(root.glob("*.py")) if "distributed" in p.read_text()]
    assert offenders == []
