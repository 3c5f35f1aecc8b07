"""Run stock Megatron-Core on CPU with the gloo backend.

Megatron-Core assumes CUDA in a few dozen places (see ``shared/CPU_MEGATRON.md``). Rather than
forking it, :func:`enable_cpu_megatron` redirects exactly those assumptions to the CPU:

* ``torch.cuda.current_device()`` -> ``torch.device("cpu")`` (rotary embeddings, p2p buffers,
  sequence-parallel gather/scatter, DDP grad buffers); ``torch.cuda.synchronize`` -> no-op.
* ``device="cuda"`` / ``Tensor.cuda()`` / ``.to("cuda")`` are rewritten to CPU by a
  ``TorchFunctionMode`` that stays active for the process (schedules, optimizer, checkpointing,
  the default causal mask).
* The model-parallel RNG tracker uses the CPU generator.
* ``clip_grad_by_total_norm_fp32`` asserts CUDA tensors: replaced by a CPU scaler.
* The bf16/fp16 optimizer (fp32 master weights) and the distributed optimizer sort parameters by
  ``param.type()`` CUDA names (``distrib_optimizer.py:361,420,582``): their constructors see CPU
  tensors under their CUDA names. The distributed optimizer's state buffers
  (``torch.cuda.current_device()``, ``.cuda()``) and its collectives (``reduce_scatter_tensor``,
  ``all_gather_into_tensor``, which gloo has) then need nothing more.
* The MoE all-to-all token dispatcher copies its split sizes to the host on a side CUDA stream:
  ``torch.cuda.Stream`` / ``current_stream`` / ``stream`` become one synchronous CPU stand-in, and
  its "device to host" copy also turns CPU split sizes into the numpy arrays gloo's
  ``all_to_all_single`` accepts (it converts only CUDA tensors).

It is a no-op when CUDA is available, so GPU runs use Megatron-Core untouched. Idempotent.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while active.

    While ``alias_cuda_types`` is set, ``Tensor.type()`` also answers ``torch.cuda.*Tensor`` for CPU
    tensors (Megatron's mixed-precision optimizer sorts parameters by those strings).
    """

    alias_cuda_types = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch._C.TensorBase.cuda):
            return args[0]
        if self.alias_cuda_types and func in (torch.Tensor.type, torch._C.TensorBase.type) and len(args) == 1:
            name = func(*args, **kwargs)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if func in (torch.Tensor.to, torch._C.TensorBase.to):
            args = tuple(torch.device("cpu") if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


class _HostStream:
    """Stand-in for a CUDA stream on CPU: everything is already synchronous."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


_HOST_STREAM = _HostStream()


class _HostStreamType:
    """``torch.cuda.Stream(...)`` on CPU: returns the one host stream. A class, not a function, so
    that modules imported later (transformers' generation utilities) can write ``Stream | None``."""

    def __new__(cls, *args, **kwargs):
        return _HOST_STREAM


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """CPU twin of ``moe_utils.maybe_move_tensor_to_cpu`` (which skips tensors already on CPU)."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32``."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(clip_coeff)


def _alias_cuda_types_during(cls, mode: _CudaToCpuMode) -> None:
    """Run ``cls.__init__`` (which checks ``param.type()`` for CUDA types) with the alias on."""
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        mode.alias_cuda_types = True
        try:
            original(self, *args, **kwargs)
        finally:
            mode.alias_cuda_types = False

    cls.__init__ = __init__


def enable_cpu_megatron() -> bool:
    """Make Megatron-Core run on CPU. Returns True if the CPU redirection is active."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which must stay untouched.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.Stream = _HostStreamType  # a class: annotations like ``torch.cuda.Stream | None`` still work
    torch.cuda.current_stream = lambda *a, **k: _HOST_STREAM
    torch.cuda.stream = lambda *a, **k: _HOST_STREAM

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy

    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _alias_cuda_types_during(optimizer.Float16OptimizerWithFloat16Params, _MODE)
    _alias_cuda_types_during(DistributedOptimizer, _MODE)
    _ENABLED = True
    return True


def device() -> torch.device:
    """The device this process computes on: the current CUDA device, or CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
