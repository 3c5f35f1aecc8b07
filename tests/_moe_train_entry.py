"""torchrun entry of tests/test_moe_trainer.py: ``dapo_megatron.train`` with the HF engine's router
weights perturbed (a stand-in for train/rollout numerics drift in the router).

``python tests/_moe_train_entry.py --router-perturb STD <train args>``: the engine's initial
weights and every weight sync into it get ``N(0, STD)`` added to each ``mlp.gate.weight`` (the
same draw per tensor name every time: the engine's router is the trainer's plus a fixed offset);
``STD = 0``: plain ``dapo_megatron.train``. The patch lives here, in the tests, not in the trainer.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _noise(name: str, tensor, std: float):
    """The fixed offset of router weight ``name`` (the same draw at every sync)."""
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(tensor.shape, generator=g, dtype=torch.float32).to(tensor.dtype) * std


def _patch_engine(std: float) -> None:
    import torch

    from dapo_megatron.rollout.hf_engine import HFEngine

    init, update_weights = HFEngine.__init__, HFEngine.update_weights

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)  # the engine starts from hf_dir: perturb its router there too
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.add_(_noise(name, p, std))

    def patched_update(self, named_tensors):
        def perturbed():
            for name, tensor in named_tensors:
                if name.endswith("mlp.gate.weight"):
                    tensor = tensor + _noise(name, tensor, std)
                yield name, tensor

        return update_weights(self, perturbed())

    HFEngine.__init__, HFEngine.update_weights = patched_init, patched_update


def main() -> int:
    argv = sys.argv[1:]
    std = 0.0
    if argv[:1] == ["--router-perturb"]:
        std, argv = float(argv[1]), argv[2:]
    if std > 0:
        _patch_engine(std)
    from dapo_megatron.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
