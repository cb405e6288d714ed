"""DeepSpeed ZeRO-3 engine: the three DiT copies partitioned over all ranks, same interface as `LocalEngine`.

- teacher: partitioned, no optimizer, requires_grad off for good (DeepSpeed's parameter-offload engine);
- fake_score, generator: each a DeepSpeed engine with its own Adam (β from the config, §6), gradient
  accumulation and gradient clipping exactly as configured.
Parameters are partitioned by `deepspeed.zero.Init(module=...)` before any network is moved to the
accelerator, so no rank ever holds a full extra copy on the device.

The generator step backpropagates through the frozen fake score and teacher (input gradients only, §3):
their parameters are gathered by ZeRO-3's forward/backward hooks, `requires_grad` is off so no weight
gradient is computed, and their engines' reduce hooks never fire. Every rank runs the same K' (the
trainer draws it from a seed shared by all ranks), so all ranks issue the same gathers: no deadlock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sid_fast.config import EngineConfig, OptimConfig, TrainConfig
from sid_fast.engine.base import TRAINABLE, requires_grad_off
from sid_fast.engine.ds_config import network_config
from sid_fast.engine.reshard import convert_to_universal
from sid_fast.engine.sharded_ema import ShardedEMA, SwappedWeights, gathered_state_dict

__all__ = ["DeepSpeedEngine", "init_distributed"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed (env:// from the `deepspeed`/torchrun launcher, or a
    1-process group when started as a plain script).

    Collectives time out after SID_FAST_DIST_TIMEOUT_S seconds (default 600, DeepSpeed's own default): a rank that
    dies fails its peers' collectives at once (gloo: connection reset), one that hangs after this timeout; then
    `sid_fast.errors.lost_rank_error` names the lost rank (docs/reliability.md). Raise it when a legitimate wait
    can be longer (rank 0 hashing a very large checkpoint while the others wait at the barrier)."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python script.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and os.environ.get("SID_FAST_CPU_SHM", "0") != "1":
        # DeepSpeed compiles a shared-memory all-reduce op (~90 s) on first CPU use; gloo does the same job
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if backend is None:
        backend = "gloo" if on_cpu else get_accelerator().communication_backend_name()
    raw = os.environ.get("SID_FAST_DIST_TIMEOUT_S", "600")
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        from sid_fast.errors import ConfigError

        raise ConfigError(f"environment variable SID_FAST_DIST_TIMEOUT_S: expected a number of seconds > 0, got {raw!r}")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout))


def _zero3_checkpoint(block: nn.Module, *args):
    """DeepSpeed's activation checkpointing (ZeRO-3 aware); torch's non-reentrant checkpoint rejects the changed
    saved tensors of partitioned parameters and its re-entrant one reduces a gradient twice."""
    from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint

    return checkpoint(block.__call__, *args)


def _enable_activation_checkpointing(module: nn.Module, name: str) -> None:
    for sub in module.modules():
        if hasattr(sub, "enable_gradient_checkpointing"):
            sub.enable_gradient_checkpointing(gradient_checkpointing_func=_zero3_checkpoint)
            return
    raise ValueError(f"config field engine.activation_checkpointing: the {name} ({type(module).__name__}) has no "
                     "`enable_gradient_checkpointing`; switch it off for this model")


class DeepSpeedEngine:
    """Holds teacher, fake score and generator as ZeRO-3 engines. See the module docstring."""

    def __init__(self, teacher: nn.Module, fake_score: nn.Module, generator: nn.Module, optim: OptimConfig,
                 train: TrainConfig, engine: EngineConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        init_distributed(engine.backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        accelerator = get_accelerator()
        self.device = torch.device(accelerator.current_device_name())
        self.engine_config, self.optim_config, self.grad_accum = engine, optim, train.grad_accum
        use_ds_optimizer = engine.optimizer == "deepspeed" or (engine.optimizer == "auto" and self.device.type != "cpu")
        dtype = torch.bfloat16 if engine.bf16 else torch.float32
        self.configs = {
            "teacher": network_config(engine, optim, train, None, use_ds_optimizer),
            "fake_score": network_config(engine, optim, train, optim.lr_fake, use_ds_optimizer),
            "generator": network_config(engine, optim, train, optim.lr_generator, use_ds_optimizer),
        }
        shared = {id(p) for p in teacher.parameters()} & {id(p) for p in fake_score.parameters()}
        if shared:
            raise ValueError("config field teacher.fake_lora_rank: a fake score sharing weights with the teacher "
                             f"({len(shared)} shared parameters) is not supported by the DeepSpeed engine yet; "
                             "use a full fake-score copy (fake_lora_rank=0) or engine.kind=local")
        self.engines = {}
        for name, module, lr in (("teacher", teacher, None), ("fake_score", fake_score, optim.lr_fake),
                                 ("generator", generator, optim.lr_generator)):
            if name == "teacher":
                module.eval().requires_grad_(False)
            else:
                module.train()
            if not any(True for _ in module.parameters()):  # e.g. the exact mixture teacher (§9): nothing to shard
                self.engines[name] = None
                setattr(self, name, module.to(self.device))
                continue
            module = module.to(dtype)
            if engine.activation_checkpointing:
                _enable_activation_checkpointing(module, name)
            # partition before anything reaches the device: each rank keeps 1/world of every parameter
            deepspeed.zero.Init(module=module, config_dict_or_path=self.configs[name], dtype=dtype)
            client_optimizer = None
            if lr is not None and not use_ds_optimizer:
                client_optimizer = torch.optim.Adam(
                    [p for p in module.parameters() if p.requires_grad], lr=lr,
                    betas=(float(optim.beta1), float(optim.beta2)), eps=optim.eps, weight_decay=optim.weight_decay)
            ds_engine, *_ = deepspeed.initialize(model=module, optimizer=client_optimizer, config=self.configs[name])
            self.engines[name] = ds_engine
            # the trainer calls the plain module; ZeRO-3's hooks live on it and gather parameters on use
            setattr(self, name, ds_engine.module)
        for name in TRAINABLE:
            if self.engines[name] is None:
                raise ValueError(f"the {name} has no parameters to train")
        self.micro_steps = {name: 0 for name in TRAINABLE}
        self.updates = {name: 0 for name in TRAINABLE}
        self._frozen_until_backward: dict[str, list] = {}
        self.ema = None
        if train.ema_decay > 0:
            self.ema = ShardedEMA(self.generator, train.ema_decay, sharded=engine.sharded_ema)

    # ------------------------------------------------------------------ stepping

    def network(self, name: str) -> nn.Module:
        if name not in ("teacher", *TRAINABLE):
            raise ValueError(f"unknown network {name!r}")
        return getattr(self, name)

    def backward(self, name: str, loss: Tensor) -> None:
        if name in self._frozen_until_backward:
            raise RuntimeError(f"backward into the {name}, which is frozen until the current backward completes")
        # DeepSpeed divides by gradient_accumulation_steps itself (scale_wrt_gas)
        self.engines[name].backward(loss)
        for flags in self._frozen_until_backward.values():
            for p, flag in flags:
                p.requires_grad_(flag)
        self._frozen_until_backward.clear()

    def step(self, name: str) -> dict:
        ds_engine = self.engines[name]
        self.micro_steps[name] += 1
        boundary = ds_engine.is_gradient_accumulation_boundary()
        ds_engine.step()
        if not boundary:
            return {}
        self.updates[name] += 1
        norm = ds_engine.get_global_grad_norm()
        return {"grad_norm": float(norm) if norm is not None else float("nan")}

    @contextlib.contextmanager
    def frozen(self, name: str):
        """No weight gradients for `name` (input gradients flow, §3). With activation checkpointing the blocks
        are recomputed inside the next backward, so the network stays frozen until that backward completes."""
        if not self.engine_config.activation_checkpointing:
            with requires_grad_off(self.network(name)):
                yield
            return
        flags = [(p, p.requires_grad) for p in self.network(name).parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            self._frozen_until_backward.setdefault(name, flags)

    def ema_update(self) -> None:
        if self.ema is not None:
            self.ema.update(self.generator)

    def sampling_generator(self, ema: bool = True) -> nn.Module:
        if not ema or self.ema is None:
            return self.generator
        return SwappedWeights(self.generator, self.ema)

    def generator_state_dict(self, ema: bool = True) -> dict[str, Tensor]:
        """Full generator weights on CPU on every rank (gathered one parameter at a time)."""
        if ema and self.ema is not None:
            with self.ema.swapped_in(self.generator):
                return gathered_state_dict(self.generator)
        return gathered_state_dict(self.generator)

    # ------------------------------------------------------------------ checkpoint state

    def save_state(self, directory: Path) -> None:
        """DeepSpeed's sharded checkpoint of both trainable engines (weights, Adam states, schedulers) under
        `directory/<name>/`, the EMA partitions per rank, and engine.json. All ranks call this."""
        directory = Path(directory)
        for name in TRAINABLE:
            self.engines[name].save_checkpoint(str(directory), tag=name, save_latest=False,
                                               client_state={"updates": self.updates[name]})
        if self.ema is not None:
            self.ema.save(directory, self.rank, self.world_size)
        if self.rank == 0:
            meta = {"world_size": self.world_size, "micro_steps": self.micro_steps, "updates": self.updates,
                    "ema_updates": self.ema.updates if self.ema is not None else None,
                    "ema_sharded": self.ema.sharded if self.ema is not None else None}
            (directory / "engine.json").write_text(json.dumps(meta))
        dist.barrier()

    def load_state(self, directory: Path) -> None:
        """Restore `save_state`; onto another world size through DeepSpeed's universal checkpoint."""
        directory = Path(directory)
        meta_file = directory / "engine.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: not a DeepSpeed engine checkpoint (saved by the local engine?)")
        meta = json.loads(meta_file.read_text())
        source = directory
        if meta["world_size"] != self.world_size:
            source = convert_to_universal(directory, TRAINABLE, self.rank)
        for name in TRAINABLE:
            ds_engine = self.engines[name]
            ds_engine._config.load_universal_checkpoint = source != directory
            path, _ = ds_engine.load_checkpoint(str(source), tag=name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
            ds_engine._config.load_universal_checkpoint = False
            if path is None:
                raise FileNotFoundError(f"{directory}/{name}: DeepSpeed found no checkpoint to load")
        self.micro_steps, self.updates = meta["micro_steps"], meta["updates"]
        if self.ema is not None:
            self.ema.load(directory, self.generator, self.rank, self.world_size, meta["world_size"])
            self.ema.updates = meta["ema_updates"] or 0
        dist.barrier()
        if source != directory and self.rank == 0:  # the universal copy was only a bridge
            shutil.rmtree(source, ignore_errors=True)

    # ------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_mean(self, value: Tensor) -> Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def model_state_bytes(self, name: str) -> int:
        """This rank's bytes of parameters, fp32 master partitions and Adam states of network `name`."""
        total = self.parameter_bytes(name)
        optimizer = self.engines[name].optimizer if self.engines.get(name) is not None else None
        for flat in getattr(optimizer, "fp32_partitioned_groups_flat", []):
            total += flat.numel() * flat.element_size()
        for state in getattr(getattr(optimizer, "optimizer", None), "state", {}).values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        return total

    def parameter_bytes(self, name: str) -> int:
        """Bytes of `name`'s parameters held by this rank (its ZeRO-3 partitions, or the whole when unsharded)."""
        total = 0
        for p in self.network(name).parameters():
            held = p.ds_tensor if hasattr(p, "ds_tensor") else p
            total += held.numel() * held.element_size()
        return total
