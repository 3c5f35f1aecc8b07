"""Process groups, Megatron initialisation and the CPU execution layer."""

from dapo_megatron.parallel.cpu import device, enable_cpu_megatron

__all__ = ["device", "enable_cpu_megatron"]
