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

LoRA fake score (teacher.fake_lora_rank > 0, `sid_fast.models.lora`): the fake score is a second module tree over
the teacher's own Parameter objects plus peft LoRA layers. Both trees hang under one root (`SharedBase`) that is
partitioned once and given to ONE DeepSpeed engine whose Adam holds the adapters only: one partitioned copy of the
frozen base serves the teacher (its own tree, no adapters: the fake score with adapters disabled, bit for bit) and
the fake score. The trees are separate module objects on purpose: ZeRO-3 keeps its backward bookkeeping per module
(`ds_grads_remaining`, reset at every forward), so one module called as teacher and again as fake score inside one
generator-step graph would release its gathered weights after the first of the two backwards only and leave the
others gathered until the end of the step; with two trees each module is called once and a shared parameter stays
gathered while any module using it is active (`ds_active_sub_modules`). The root is never called itself, so
DeepSpeed records no module trace for it and gathers the shared base on use, without prefetching.
Checkpoints of that engine hold the adapters and their Adam states only (`exclude_frozen_parameters`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sid_fast.config import EngineConfig, OptimConfig, TrainConfig
from sid_fast.engine.base import TRAINABLE, frozen_network, release_frozen
from sid_fast.engine.ds_config import network_config
from sid_fast.engine.local import enable_activation_checkpointing
from sid_fast.engine.reshard import convert_to_universal
from sid_fast.engine.sharded_ema import ShardedEMA, SwappedWeights, gathered_state_dict

__all__ = ["DeepSpeedEngine", "SharedBase", "init_distributed"]


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

    if torch.is_grad_enabled() and not any(torch.is_tensor(a) and a.requires_grad for a in args) \
            and any(p.requires_grad for p in block.parameters()):
        # a re-entrant checkpoint's outputs carry a graph only when an input requires grad; a block whose only
        # trainable weights are its own (a LoRA fake score's adapters over the frozen base, in its own step) would
        # get none and its adapters no gradient. Its (graph-less) hidden-state input is made a leaf that requires
        # grad, as transformers' enable_input_require_grads does.
        args = list(args)
        for index, value in enumerate(args):
            if torch.is_tensor(value) and value.is_floating_point():
                args[index] = value.detach().requires_grad_(True)
                break
    return checkpoint(block.__call__, *args)


class SharedBase(nn.Module):
    """Root module of the LoRA fake score's ZeRO-3 engine: the teacher's tree and the fake score's tree (teacher +
    adapters) whose base parameters are the same Parameter objects. `parameters()` yields each shared parameter once,
    so it is partitioned once; every submodule of both trees gets ZeRO-3's hooks. Never called itself: the engine
    hands out `.teacher` and `.fake_score`."""

    def __init__(self, teacher: nn.Module, fake_score: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.fake_score = fake_score

    def forward(self, *args, **kwargs):
        raise RuntimeError("SharedBase is a container: call its .teacher or .fake_score")


def _check_shared_base(teacher: nn.Module, base: list, adapters: list) -> None:
    """A fake score that shares weights must be the teacher plus trainable adapters: all of the teacher's
    parameters, frozen, and nothing else shared."""
    teacher_params = list(teacher.parameters())
    if len(base) != len(teacher_params):
        raise ValueError(f"config field teacher.fake_lora_rank: the fake score shares {len(base)} of the teacher's "
                         f"{len(teacher_params)} parameters; the DeepSpeed engine takes a fake score that is the whole "
                         "teacher plus adapters (sid_fast.models.lora.make_lora_fake_score) or a full copy")
    if any(p.requires_grad for p in base):
        raise ValueError("config field teacher.fake_lora_rank: the teacher's weights shared with the fake score must "
                         "be frozen (requires_grad False); only the adapters train")
    if not any(p.requires_grad for p in adapters):
        raise ValueError("config field teacher.fake_lora_rank: the fake score shares the teacher's weights but has "
                         "no trainable adapters")


class DeepSpeedEngine:
    """Holds teacher, fake score and generator as ZeRO-3 engines. See the module docstring."""

    def __init__(self, teacher: nn.Module, fake_score: nn.Module, generator: nn.Module, optim: OptimConfig,
                 train: TrainConfig, engine: EngineConfig, checkpointed: tuple[str, ...] | None = None):
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
        from sid_fast.models.lora import split_shared

        base, adapters = split_shared(teacher, fake_score)
        self.shared_base = bool(base)
        """True for a LoRA fake score: teacher and fake score share one partitioned base (see the module docstring)."""
        if self.shared_base:
            _check_shared_base(teacher, base, adapters)
            # one root, one partitioning, one engine: the teacher's tree (no adapters) and the fake score's tree
            groups = [("fake_score", SharedBase(teacher, fake_score), optim.lr_fake,
                       (("teacher", teacher), ("fake_score", fake_score))),
                      ("generator", generator, optim.lr_generator, (("generator", generator),))]
            self.engines = {"teacher": None}
        else:
            groups = [(name, module, lr, ((name, module),)) for name, module, lr in (
                ("teacher", teacher, None), ("fake_score", fake_score, optim.lr_fake),
                ("generator", generator, optim.lr_generator))]
            self.engines = {}
        if checkpointed is None:  # named in the config (build_engine resolves `auto` before it comes here)
            checkpointed = tuple(n.strip() for n in engine.checkpoint_networks.split(",")) if engine.activation_checkpointing else ()
        self.checkpointed = tuple(checkpointed)
        for engine_name, root, lr, members in groups:
            for name, module in members:
                if name == "teacher":
                    module.eval().requires_grad_(False)
                else:
                    module.train()
            if not any(True for _ in root.parameters()):  # e.g. the exact mixture teacher (§9): nothing to shard
                self.engines[engine_name] = None
                setattr(self, engine_name, root.to(self.device))
                continue
            root = root.to(dtype)
            for name, module in members:
                if name in checkpointed:
                    enable_activation_checkpointing(module, name, _zero3_checkpoint)
            # partition before anything reaches the device: each rank keeps 1/world of every parameter
            deepspeed.zero.Init(module=root, config_dict_or_path=self.configs[engine_name], dtype=dtype)
            trainable = [p for p in root.parameters() if p.requires_grad]
            client_optimizer = None
            if lr is not None and not use_ds_optimizer:
                client_optimizer = torch.optim.Adam(
                    trainable, lr=lr, betas=(float(optim.beta1), float(optim.beta2)), eps=optim.eps,
                    weight_decay=optim.weight_decay)
            extra = {"model_parameters": trainable} if self.shared_base and lr is not None else {}
            ds_engine, *_ = deepspeed.initialize(model=root, optimizer=client_optimizer, config=self.configs[engine_name],
                                                 **extra)
            self.engines[engine_name] = ds_engine
            # the trainer calls the plain modules; ZeRO-3's hooks live on them and gather parameters on use
            for name, module in members:
                if name == "teacher":
                    module.eval()
                setattr(self, name, module)
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
        ds_engine = self.engines[name]
        ds_engine.backward(loss)
        # What DeepSpeedEngine.forward does before the next micro-batch (the trainer calls the modules, never the
        # engine): ZeRO-3 counts the micro-step only there; without it every backward overwrote the gradient
        # partitions and accumulation kept the last micro-batch's gradient alone.
        clear = getattr(ds_engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        release_frozen(self._frozen_until_backward)

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

    def frozen(self, name: str):
        """No weight gradients for `name` (input gradients flow, §3). With activation checkpointing the blocks
        are recomputed inside the next backward, so the network stays frozen until that backward completes."""
        held = self._frozen_until_backward if self.checkpointed else None
        return frozen_network(self.network(name), name, held)

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
            # a LoRA fake score's engine also holds the frozen base: leave it out (it is the teacher, reloaded)
            self.engines[name].save_checkpoint(str(directory), tag=name, save_latest=False,
                                               client_state={"updates": self.updates[name]},
                                               exclude_frozen_parameters=self._holds_frozen_base(name))
        if self.ema is not None:
            self.ema.save(directory, self.rank, self.world_size)
        if self.rank == 0:
            meta = {"world_size": self.world_size, "micro_steps": self.micro_steps, "updates": self.updates,
                    "shared_base": self.shared_base,
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
        if bool(meta.get("shared_base", False)) != self.shared_base:
            kinds = {True: "a LoRA fake score (teacher.fake_lora_rank > 0)", False: "a full fake-score copy"}
            raise ValueError(f"config field teacher.fake_lora_rank: {directory} was saved with "
                             f"{kinds[bool(meta.get('shared_base', False))]}, this run has {kinds[self.shared_base]}")
        source = directory
        if meta["world_size"] != self.world_size:
            source = convert_to_universal(directory, TRAINABLE, self.rank)
        for name in TRAINABLE:
            ds_engine = self.engines[name]
            ds_engine._config.load_universal_checkpoint = source != directory
            path, _ = ds_engine.load_checkpoint(str(source), tag=name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True,
                                                load_module_strict=not self._holds_frozen_base(name))
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

    def _holds_frozen_base(self, name: str) -> bool:
        return self.shared_base and name == "fake_score"

    def own_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters network `name` owns: a LoRA fake score owns its adapters, the base is the teacher's."""
        params = list(self.network(name).parameters())
        if self._holds_frozen_base(name):
            base = {id(p) for p in self.teacher.parameters()}
            params = [p for p in params if id(p) not in base]
        return params

    def model_state_parts(self, name: str) -> dict[str, int]:
        """This rank's bytes of network `name` by kind, each storage counted once: `parameters` (its ZeRO-3
        partitions), `gradients` (the partitioned gradient buffer), `master` (fp32 master partitions; 0 where DeepSpeed
        uses the parameter partitions themselves as masters), `optimizer` (Adam's moments)."""
        parts = {"parameters": self.parameter_bytes(name), "gradients": 0, "master": 0, "optimizer": 0}
        optimizer = self.engines[name].optimizer if self.engines.get(name) is not None else None
        if optimizer is None:
            return parts
        grads = getattr(optimizer, "grad_partitions_flat_buffer", None)
        if torch.is_tensor(grads):
            parts["gradients"] = grads.numel() * grads.element_size()
        low = {t.data_ptr() for t in getattr(optimizer, "fp16_partitioned_groups_flat", []) if torch.is_tensor(t)}
        for flat in getattr(optimizer, "fp32_partitioned_groups_flat", []):
            if flat.data_ptr() not in low:  # a separate fp32 copy (bf16 training, or offloaded)
                parts["master"] += flat.numel() * flat.element_size()
        for state in getattr(getattr(optimizer, "optimizer", None), "state", {}).values():
            parts["optimizer"] += sum(v.numel() * v.element_size() for v in state.values()
                                      if torch.is_tensor(v) and v.dim() > 0)
        return parts

    def model_state_bytes(self, name: str) -> int:
        """This rank's bytes of parameters, fp32 master partitions and Adam states of network `name` (its own
        parameters: a LoRA fake score's adapters; each storage once, see `model_state_parts`)."""
        parts = self.model_state_parts(name)
        return parts["parameters"] + parts["master"] + parts["optimizer"]

    def parameter_bytes(self, name: str) -> int:
        """Bytes of `name`'s own parameters held by this rank (its ZeRO-3 partitions, or the whole when unsharded);
        a LoRA fake score's base is counted with the teacher."""
        total = 0
        for p in self.own_parameters(name):
            held = p.ds_tensor if hasattr(p, "ds_tensor") else p
            total += held.numel() * held.element_size()
        return total
