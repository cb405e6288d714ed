"""The DeepSpeed JSON config of each of the three networks, derived from the sid_fast config.

The sid_fast config is the single source of truth: batch sizes, gradient accumulation, gradient clipping
(DeepSpeed 0.19 clips at 1.0 unless told otherwise, so the value is always written), Adam settings and ZeRO
options are written from it. A user JSON (`engine.ds_config`) may add or tune DeepSpeed-only keys
(bucket sizes, prefetching, comms logging, ...) but may not contradict a value the sid_fast config owns.
"""

from __future__ import annotations

import json
from pathlib import Path

from sid_fast.config import EngineConfig, OptimConfig, TrainConfig

# keys whose value the sid_fast config decides; a user JSON that disagrees is an error naming both fields
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_user_json(path: str | None) -> dict:
    """The user's DeepSpeed JSON (`engine.ds_config`), or {}."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config field engine.ds_config: DeepSpeed JSON {path!r} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"config field engine.ds_config: {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config field engine.ds_config: {path} must hold a JSON object")
    return data


def zero_section(engine: EngineConfig, trainable: bool) -> dict:
    """The `zero_optimization` block: stage 3, partitioned parameters, optional CPU offload."""
    zero = {
        "stage": engine.zero_stage,
        "stage3_param_persistence_threshold": engine.persistence_threshold,
        "contiguous_gradients": True,
        "overlap_comm": engine.overlap_comm,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if engine.persistence_threshold == 0:
        zero["stage3_model_persistence_threshold"] = 0  # partition every parameter, however small
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": engine.pin_memory}
    if engine.offload_optimizer and trainable:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": engine.pin_memory}
    return zero


def network_config(engine: EngineConfig, optim: OptimConfig, train: TrainConfig, lr: float | None,
                   use_ds_optimizer: bool) -> dict:
    """DeepSpeed config of one network; `lr` None means the frozen teacher (no optimizer)."""
    config: dict = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": zero_section(engine, trainable=lr is not None),
        "bf16": {"enabled": engine.bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if lr is not None and use_ds_optimizer:
        # §6: Adam β = (β1, β2), no weight decay by default; DeepSpeed picks FusedAdam / CPU Adam itself
        config["optimizer"] = {"type": "Adam", "params": {
            "lr": lr, "betas": [float(optim.beta1), float(optim.beta2)], "eps": optim.eps,
            "weight_decay": optim.weight_decay, "adam_w_mode": False}}
    user = load_user_json(engine.ds_config)
    for key, field in _OWNED.items():
        if key in user and user[key] != config[key]:
            raise ValueError(f"config field engine.ds_config: {engine.ds_config} sets {key}={user[key]!r} but "
                             f"{field} says {config[key]!r}; set {field} instead")
    for key in ("optimizer", "scheduler", "train_batch_size"):
        if key in user:
            raise ValueError(f"config field engine.ds_config: {engine.ds_config} may not set {key!r}; "
                             "sid_fast builds it from the optim/train sections")
    if "zero_optimization" in user and user["zero_optimization"].get("stage", engine.zero_stage) != engine.zero_stage:
        raise ValueError("config field engine.ds_config: zero_optimization.stage disagrees with engine.zero_stage")
    return _merge(config, user)
