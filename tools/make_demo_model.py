#!/usr/bin/env python
"""Build the tiny starting policy of the CPU demo (see ``dapo_megatron.demo.model``).

    python tools/make_demo_model.py --out models/demo [--seed 0 --max-operand 9 --ops + --eval]

writes a Hugging Face model directory (tiny Llama, task tokenizer with a chat template,
generation config) that answers the bundled arithmetic task in the right format but correctly
only about 30% of the time when sampled at temperature 1.0.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dapo_megatron.demo.model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
