"""Conformance of a kernel backend against its op's PyTorch reference: values and every input gradient over the
standard shapes and dtypes (used by tests/test_kernel_*.py and `sid-fast kernels check`).

Tolerance rule (STYLE.md, after flash-attention): with `gold` the reference run on fp32 copies of the inputs,
a backend passes when  max|kernel − gold| ≤ 2 · max|torch − gold| + atol  for the output and each gradient, where
`torch` is the reference run on the same low-precision inputs and atol = ATOL_REL · max|gold| (floor 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sid_fast.kernels.registry import bind, call, get_op, ineligible_reason, per_sample_loss_like

# shapes include a prime per-sample size (13), non-powers of two, FLUX-like packed tokens and several blocks
STANDARD_SHAPES: tuple[tuple[int, ...], ...] = ((3, 13), (2, 3, 5, 7), (2, 6, 64), (2, 4, 23, 29))
# the DiT block ops, small for the interpreter: a prime hidden size (13), non-powers of two (24, 48, 26 = 2 x 13
# rotary pairs), FLUX-like head dims. adaLN/gated residual: (B, N, D); RMSNorm: (..., D); rotary: (B, S, H, D)
OP_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "adaln_modulation": ((2, 5, 13), (2, 7, 48), (3, 4, 64)),
    "gated_residual": ((2, 5, 13), (2, 7, 48), (3, 4, 64)),
    "rms_norm": ((2, 3, 2, 13), (2, 5, 24), (3, 7, 64)),
    "weighted_rms_norm": ((2, 3, 2, 13), (2, 5, 24), (3, 7, 64)),
    "rotary_qk": ((2, 5, 2, 8), (2, 7, 3, 24), (1, 11, 2, 26)),
}


def op_shapes(op: str) -> tuple[tuple[int, ...], ...]:
    """The standard conformance shapes of op `op`."""
    return OP_SHAPES.get(op, STANDARD_SHAPES)
STANDARD_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
ATOL_REL = 2e-5


@dataclass
class CaseResult:
    """One (shape, dtype, quantity) comparison; `status` is pass, FAIL or skip."""

    op: str
    backend: str
    shape: tuple[int, ...]
    dtype: str
    quantity: str
    kernel_error: float
    torch_error: float
    atol: float
    status: str
    note: str = ""


def make_inputs(op: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> list:
    """Random arguments of op `op` in argument order: latents (B, ...) in `dtype`, per-sample tensors fp32
    (the block ops: activations and their per-sample scales and weights in `dtype`, rotary cos/sin fp32)."""
    gen = torch.Generator().manual_seed(seed)

    def latent(size=shape) -> Tensor:
        return torch.randn(size, generator=gen).to(dtype=dtype, device=device)

    batch = shape[0]
    if op == "cfg_sid_generator_loss":
        t = (torch.rand(batch, generator=gen) * 0.9 + 0.05).to(device)
        weight = (1 - t) * (1 + torch.rand(batch, generator=gen).to(device))
        # x_t, t, x_g, u_r, c_r, u_f, c_f, κ4, κ2, λ, α, s  (α ≠ 1 and κ4 ≠ κ2 so that a dropped term shows)
        return bind(op, latent(), t, latent(), latent(), latent(), latent(), latent(), 4.5, 2.5, weight, 1.2, 100.0)
    if op == "cfg_fake_score_loss":
        return bind(op, latent(), latent(), 3.5, latent(), latent())
    per_sample = (shape[0], shape[-1])
    if op == "adaln_modulation":  # x (B, N, D) with an offset (the mean matters), scale, shift (B, D), eps
        x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype=dtype, device=device)
        return bind(op, x, latent(per_sample), latent(per_sample), 1e-6)
    if op == "gated_residual":
        return bind(op, latent(), latent(per_sample), latent())
    if op == "rms_norm":
        return bind(op, latent(), 1e-6)
    if op == "weighted_rms_norm":
        return bind(op, latent(), latent(shape[-1:]), 1e-6)
    if op == "rotary_qk":  # angles drawn per (S, D) element, not per pair, so that a swapped index shows
        angles = torch.rand(shape[1], shape[3], generator=gen) * 6.3
        return bind(op, latent(), latent(), angles.cos().to(device), angles.sin().to(device))
    raise ValueError(f"no conformance inputs defined for op {op!r}")


def _run(op: str, backend: str, args: list, grad_out: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    spec = get_op(op)
    args = [a.detach().clone().requires_grad_(True) if isinstance(a, Tensor) else a for a in args]
    out = call(op, *args, backend=backend) if backend != "gold" else spec.reference(*args)
    leaves = [a for a in args if isinstance(a, Tensor)]
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), list(grads)


def _max_error(value: Tensor | None, gold: Tensor | None) -> float:
    if value is None or gold is None:
        return 0.0 if value is None and gold is None else float("inf")
    if value.shape != gold.shape:
        return float("inf")
    return (value.double() - gold.double()).abs().max().item()


def check_case(op: str, backend: str, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
               seed: int = 0) -> list[CaseResult]:
    """Compare `backend` with the reference on one shape and dtype: the output and every input gradient."""
    args = make_inputs(op, shape, dtype, seed, device)
    name_dtype = str(dtype).replace("torch.", "")
    reason = ineligible_reason(op, backend, args)
    if reason is not None:
        return [CaseResult(op, backend, shape, name_dtype, "*", 0.0, 0.0, 0.0, "skip", reason)]
    gold_args = [a.float() if isinstance(a, Tensor) else a for a in args]
    gold_out = get_op(op).reference(*gold_args)
    grad_out = torch.randn(gold_out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    gold_out, gold_grads = _run(op, "gold", gold_args, grad_out)
    torch_out, torch_grads = _run(op, "torch", args, grad_out)
    kernel_out, kernel_grads = _run(op, backend, args, grad_out)
    tensor_names = [n for n in get_op(op).signature.parameters if n in get_op(op).tensor_args]
    results = []
    output = "loss" if get_op(op).fake is per_sample_loss_like else "out"
    quantities = [(output, kernel_out, torch_out, gold_out)] + [
        (f"d/d{n}", k, r, g) for n, k, r, g in zip(tensor_names, kernel_grads, torch_grads, gold_grads)]
    for quantity, kernel_value, torch_value, gold in quantities:
        kernel_error, torch_error = _max_error(kernel_value, gold), _max_error(torch_value, gold)
        atol = max(ATOL_REL * (gold.abs().max().item() if gold is not None else 0.0), 1e-6)
        finite = kernel_value is None or bool(torch.isfinite(kernel_value).all())
        dtype_ok = kernel_value is None or torch_value is None or kernel_value.dtype == torch_value.dtype
        passed = finite and dtype_ok and kernel_error <= 2 * torch_error + atol
        note = "" if finite else "non-finite values"
        note = note or ("" if dtype_ok else f"dtype {kernel_value.dtype} != reference {torch_value.dtype}")
        results.append(CaseResult(op, backend, shape, name_dtype, quantity, kernel_error, torch_error, atol,
                                  "pass" if passed else "FAIL", note))
    return results


def check_backend(op: str, backend: str, shapes=None, dtypes=STANDARD_DTYPES,
                  device: str = "cpu") -> list[CaseResult]:
    """All cases of `backend` for op `op` (shapes: default the op's standard shapes)."""
    results = []
    for shape in shapes if shapes is not None else op_shapes(op):
        for dtype in dtypes:
            results += check_case(op, backend, tuple(shape), dtype, device)
    return results


def passed(results: list[CaseResult]) -> bool:
    """True when at least one case ran and none failed."""
    return any(r.status == "pass" for r in results) and not any(r.status == "FAIL" for r in results)


def report(results: list[CaseResult], failures_only: bool = False) -> str:
    """A readable table: one line per compared quantity (or only the failures and skips)."""
    lines = [f"{'op':<24} {'backend':<8} {'shape':<16} {'dtype':<9} {'quantity':<20} {'max err':>10} "
             f"{'torch err':>10} {'allowed':>10}  status"]
    for r in results:
        if failures_only and r.status == "pass":
            continue
        allowed = 2 * r.torch_error + r.atol
        lines.append(f"{r.op:<24} {r.backend:<8} {str(r.shape):<16} {r.dtype:<9} {r.quantity:<20} "
                     f"{r.kernel_error:>10.3g} {r.torch_error:>10.3g} {allowed:>10.3g}  {r.status}"
                     + (f"  ({r.note})" if r.note else ""))
    ran = sum(r.status != "skip" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    lines.append(f"{ran} comparisons, {failed} failed, {sum(r.status == 'skip' for r in results)} skipped: "
                 + ("PASS" if passed(results) else "FAIL"))
    return "\n".join(lines)
