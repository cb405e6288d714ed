"""The op registry: every fused op has a name, a PyTorch reference and implementations by backend.

    from sid_fast import kernels
    loss = kernels.call("cfg_sid_generator_loss", x_t, t, x_g, ..., backend="triton")
    kernels.register_kernel("cfg_sid_generator_loss", "mine", my_function)   # plug in your own

`torch` always means the reference itself (plain PyTorch, differentiated by autograd). A backend registered with
`direct=True` (the loss ops' `compile`: torch.compile of the reference) is called as it is and differentiated by
autograd. Any other backend is one opaque op with its own backward: inside `torch.compile` a
`torch.library.custom_op` named `sid_fast::<op>` with a fake (meta) implementation and a registered autograd
formula, so the compiler and ZeRO-3 see one op instead of tracing into Triton or C++; in eager mode the same
forward and backward run through a plain `torch.autograd.Function`, which costs about 0.2 ms less per forward +
backward on the CPU than the custom op's Python dispatch.
When the chosen backend is not eligible for the inputs (device, dtype, shape) the reference runs instead and one
log line says why.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger("sid_fast.kernels")

REFERENCE = "torch"


@dataclass
class Implementation:
    """One backend of an op.

    forward: same signature as the reference, returns the op's output. When `backward` is None it must be
      differentiable by autograd (the registry re-runs it under autograd to get input gradients).
    backward: optional (grad_output, *args) -> tuple of gradients, one per tensor argument, in argument order
      (runs inside the `sid_fast::<op>_backward` custom op; without it the forward is differentiated by autograd).
    eligible: optional (*args) -> None when the inputs suit this backend, else a short reason.
    direct: call `forward` as it is, differentiated by autograd, instead of wrapping it in one opaque op (for a
      backend that is itself PyTorch, e.g. torch.compile of the reference; `backward` is then unused).
    """

    forward: Callable
    backward: Callable | None = None
    eligible: Callable | None = None
    direct: bool = False


@dataclass
class OpSpec:
    """A named op: its reference, argument kinds and registered implementations."""

    name: str
    reference: Callable
    tensor_args: tuple[str, ...]
    float_args: tuple[str, ...]
    implementations: dict[str, Implementation] = field(default_factory=dict)
    signature: inspect.Signature | None = None
    fake: Callable | None = None
    custom_op: object | None = None
    backward_op: object | None = None
    eager_op: type | None = None


_OPS: dict[str, OpSpec] = {}
_CONFIGURED: dict[str, str] = {}
_WARNED: set[tuple[str, str, str]] = set()


def ops() -> dict[str, OpSpec]:
    """All registered ops by name."""
    return dict(_OPS)


def get_op(name: str) -> OpSpec:
    if name not in _OPS:
        raise ValueError(f"unknown kernel op {name!r}; known: {sorted(_OPS)}")
    return _OPS[name]


def backends(name: str) -> list[str]:
    """Backend names of op `name`, the reference (`torch`) first."""
    return [REFERENCE, *sorted(get_op(name).implementations)]


def per_sample_loss_like(*args) -> Tensor:
    """Fake (meta) output of the loss ops: a per-sample (B,) fp32 vector on the first tensor's device."""
    return torch.empty(args[0].shape[0], dtype=torch.float32, device=args[0].device)


def register_op(name: str, reference: Callable, fake: Callable = per_sample_loss_like) -> OpSpec:
    """Declare op `name` with its PyTorch reference; tensor vs float arguments come from the annotations.

    `fake(*args)` returns an empty tensor with the output's shape, dtype and device (the custom op's meta
    implementation, used by torch.compile); the default is the loss ops' per-sample (B,) fp32 vector.
    """
    signature = inspect.signature(reference)
    tensor_args, float_args, order = [], [], []
    for param in signature.parameters.values():
        annotation = str(param.annotation)
        if "Tensor" in annotation:
            tensor_args.append(param.name)
            order.append(f"Tensor {param.name}")
        elif "float" in annotation:
            float_args.append(param.name)
            order.append(f"float {param.name}")
        else:
            raise TypeError(f"op {name}: argument {param.name!r} must be annotated Tensor or float, got {annotation}")
    spec = OpSpec(name, reference, tuple(tensor_args), tuple(float_args), signature=signature, fake=fake)
    _define_custom_op(spec, ", ".join(order))
    _OPS[name] = spec
    return spec


def register_kernel(name: str, backend: str, forward: Callable, backward: Callable | None = None,
                    eligible: Callable | None = None, direct: bool = False) -> None:
    """Register `forward` (same signature as the reference) as backend `backend` of op `name`."""
    if backend == REFERENCE:
        raise ValueError(f"backend name {REFERENCE!r} is reserved for the reference of op {name!r}")
    get_op(name).implementations[backend] = Implementation(forward, backward, eligible, direct)


def unregister_kernel(name: str, backend: str) -> None:
    get_op(name).implementations.pop(backend, None)


def set_backend(name: str, backend: str) -> None:
    """Make `backend` the default of op `name` for calls that do not pass one."""
    _check_backend(name, backend)
    _CONFIGURED[name] = backend


def _check_backend(name: str, backend: str) -> None:
    known = backends(name)
    if backend not in known:
        raise ValueError(f"op {name!r} has no backend {backend!r}; registered: {known}")


def bind(name: str, *args, **kwargs) -> list:
    """Positional argument list of op `name` with the reference's defaults filled in."""
    if not kwargs and len(args) == len(get_op(name).signature.parameters):
        return list(args)
    bound = get_op(name).signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def ineligible_reason(name: str, backend: str, args: list) -> str | None:
    """Why `backend` cannot run op `name` on `args` (None when it can)."""
    if backend == REFERENCE:
        return None
    impl = get_op(name).implementations[backend]
    return impl.eligible(*args) if impl.eligible is not None else None


def call(name: str, *args, backend: str | None = None, **kwargs) -> Tensor:
    """Run op `name` with `backend` (default: the one set by `set_backend`, else the reference)."""
    spec = get_op(name)
    backend = backend or _CONFIGURED.get(name, REFERENCE)
    _check_backend(name, backend)
    values = bind(name, *args, **kwargs)
    if backend == REFERENCE:
        return spec.reference(*values)
    reason = ineligible_reason(name, backend, values)
    if reason is not None:
        key = (name, backend, reason)
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("kernel op %s: backend %r not eligible (%s); running the torch reference",
                        name, backend, reason)
        return spec.reference(*values)
    if spec.implementations[backend].direct:
        return spec.implementations[backend].forward(*values)
    values = [float(v) if n in spec.float_args else v for n, v in zip(spec.signature.parameters, values)]
    if torch.compiler.is_compiling():
        return spec.custom_op(*values, backend)
    return spec.eager_op.apply(name, backend, *values)


# ---------------------------------------------------------------- torch.library wrapping


def _tensor_positions(spec: OpSpec) -> list[int]:
    return [i for i, n in enumerate(spec.signature.parameters) if n in spec.tensor_args]


def _autograd_backward(spec: OpSpec, impl: Implementation, grad: Tensor, args: list) -> list[Tensor]:
    """Input gradients of a forward-only implementation, by re-running it under autograd."""
    positions = _tensor_positions(spec)
    args = list(args)
    leaves = []
    for i in positions:
        leaf = args[i].detach().requires_grad_(args[i].is_floating_point())
        args[i] = leaf
        leaves.append(leaf)
    with torch.enable_grad():
        out = impl.forward(*args)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    result = []
    for leaf in leaves:
        g = next(grads) if leaf.requires_grad else None
        result.append(torch.zeros_like(leaf) if g is None else g)
    return result


def _own_output(out: Tensor, values: list) -> Tensor:
    # Outputs are contiguous, as the fakes declare: torch.compile asserts the strides a fake promised, and an input
    # view (SD3.5 normalises q/k as a transposed (B, H, S, D) view) must not leak its layout into a result.
    return out.clone() if any(out is v for v in values) else out.contiguous()


def _backend_gradients(name: str, backend: str, grad: Tensor, values: list) -> list[Tensor]:
    """One contiguous gradient per tensor argument: the backend's backward, or autograd through its forward."""
    spec = get_op(name)
    impl = spec.implementations[backend]
    if impl.backward is None:  # forward-only kernel: differentiate it
        return _autograd_backward(spec, impl, grad, values)
    return [g.contiguous() for g in impl.backward(grad.contiguous(), *values)]


class _EagerOp(torch.autograd.Function):
    """The eager-mode twin of the custom op: the same forward and backward, without torch.library's dispatch.
    Each op gets a subclass named `sid_fast_<op>`, so its autograd node reads `sid_fast_<op>Backward`."""

    @staticmethod
    def forward(ctx, name: str, backend: str, *values):
        out = _own_output(get_op(name).implementations[backend].forward(*values), values)
        ctx.name, ctx.backend = name, backend
        ctx.constants = [None if isinstance(v, Tensor) else v for v in values]
        ctx.save_for_backward(*[v for v in values if isinstance(v, Tensor)])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        saved = iter(ctx.saved_tensors)
        values = [next(saved) if v is None else v for v in ctx.constants]
        grads = iter(_backend_gradients(ctx.name, ctx.backend, grad, values))
        return (None, None, *[next(grads) if isinstance(v, Tensor) else None for v in values])


def _define_custom_op(spec: OpSpec, arg_schema: str) -> None:
    name = spec.name
    spec.eager_op = type(f"sid_fast_{name}", (_EagerOp,), {"__module__": __name__})

    def forward(*args):
        *values, backend = args
        return _own_output(get_op(name).implementations[backend].forward(*values), values)

    def fake_forward(*args):
        *values, _backend = args
        return get_op(name).fake(*values)

    def backward_impl(*args):
        grad, *values, backend = args
        return [g.contiguous() for g in get_op(name).implementations[backend].backward(grad, *values)]

    def fake_backward(*args):
        _grad, *values, _backend = args
        return [torch.empty_like(values[i], memory_format=torch.contiguous_format)
                for i in _tensor_positions(get_op(name))]

    spec.custom_op = torch.library.custom_op(f"sid_fast::{name}", forward, mutates_args=(),
                                             schema=f"({arg_schema}, str backend) -> Tensor")
    spec.custom_op.register_fake(fake_forward)
    spec.backward_op = torch.library.custom_op(f"sid_fast::{name}_backward", backward_impl, mutates_args=(),
                                               schema=f"(Tensor grad, {arg_schema}, str backend) -> Tensor[]")
    spec.backward_op.register_fake(fake_backward)

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.save_for_backward(*[v for v in inputs if isinstance(v, Tensor)])

    def autograd_backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        *values, backend = [next(saved) if isinstance(v, Tensor) else v for v in ctx.inputs]
        impl = get_op(name).implementations[backend]
        if impl.backward is None:  # forward-only kernel: differentiate it here, above the dispatcher's autograd key
            grads = iter(_autograd_backward(get_op(name), impl, grad, values))
        else:
            grads = iter(spec.backward_op(grad.contiguous(), *values, backend))
        return tuple(next(grads) if isinstance(v, Tensor) else None for v in ctx.inputs)

    spec.custom_op.register_autograd(autograd_backward, setup_context=setup_context)
