"""`sid-fast kernels check|bench|list`: conformance and timing of the fused-op backends (docs/kernels.md).

    sid-fast kernels check mypkg.losses:my_loss --op cfg_sid_generator_loss   # a user's kernel vs the reference
    sid-fast kernels check --backend cpp --op cfg_fake_score_loss              # a built-in backend
    sid-fast kernels bench --op cfg_sid_generator_loss --shape 4,16,32,32      # time every backend + compile
    sid-fast kernels check --backend triton --op rms_norm                      # a DiT block op (GPU, or
                                                                               # TRITON_INTERPRET=1 on the CPU)
"""

from __future__ import annotations

import importlib

from sid_fast.errors import UserError

USER_BACKEND = "user"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="compare a kernel's values and gradients with the op's reference")
    check.add_argument("function", nargs="?", help="MODULE:FUNCTION with the reference's signature (differentiable)")
    check.add_argument("--op", required=True, help="op name, e.g. cfg_sid_generator_loss or rotary_qk")
    check.add_argument("--backward", help="optional MODULE:FUNCTION (grad, *args) -> gradients of the tensor inputs")
    check.add_argument("--backend", help="check a registered backend instead of FUNCTION (triton, cpp, ...)")
    check.add_argument("--dtypes", default="float32,float16,bfloat16", help="comma-separated dtypes")
    check.add_argument("--device", default="cpu", help="torch device of the inputs")
    check.add_argument("--verbose", action="store_true", help="print every comparison, not only failures")
    bench = sub.add_parser("bench", help="time backends against eager PyTorch and torch.compile")
    bench.add_argument("function", nargs="?", help="optional MODULE:FUNCTION to time as backend 'user'")
    bench.add_argument("--op", default=None, help="op name (default: all ops)")
    bench.add_argument("--backends", default=None, help="comma-separated providers (default: all + compile)")
    bench.add_argument("--shape", default=None,
                       help="input shape: latents B,C,H,W or B,N,D; block ops B,N,D or B,S,H,D "
                            "(default per op: 4,16,32,32 for the losses, kernels.timing.BENCH_SHAPES for block ops)")
    bench.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    bench.add_argument("--device", default="cpu", help="torch device")
    bench.add_argument("--repeat", type=int, default=10, help="timed repetitions per provider and mode")
    bench.add_argument("--csv", default=None, help="append the rows to this CSV")
    sub.add_parser("list", help="list ops and their backends")


def _import(spec: str):
    if ":" not in spec:
        raise UserError(f"{spec!r}: expected MODULE:FUNCTION, e.g. mypkg.losses:my_loss")
    module_name, attribute = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{spec}: cannot import module {module_name!r} ({error})") from error
    if not hasattr(module, attribute):
        raise UserError(f"{spec}: module {module_name!r} has no attribute {attribute!r}")
    return getattr(module, attribute)


def _dtypes(text: str, option: str = "--dtypes"):
    import torch

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"{option} {text!r}: name at least one dtype (float32, float16, bfloat16)")
    for name in names:
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise UserError(f"{option} {text}: unknown dtype {name!r}; use float32, float16, bfloat16")
    return [getattr(torch, name) for name in names]


def run(args) -> int:
    from sid_fast import kernels
    from sid_fast.kernels import conformance, timing

    if args.action == "list":
        for name in kernels.ops():
            print(f"{name}: {', '.join(kernels.backends(name))}")
        return 0
    ops = [args.op] if args.op else list(kernels.ops())
    for name in ops:
        if name not in kernels.ops():
            raise UserError(f"--op {name}: unknown op; known: {', '.join(sorted(kernels.ops()))}")
    backend = getattr(args, "backend", None)
    if backend is not None and not args.function and backend not in kernels.backends(args.op):
        raise UserError(f"--backend {backend}: op {args.op} has no such backend; registered: "
                        f"{', '.join(kernels.backends(args.op))}")
    if args.function:
        for name in ops:
            backward = _import(args.backward) if getattr(args, "backward", None) else None
            kernels.register_kernel(name, USER_BACKEND, _import(args.function), backward)
    if args.action == "check":
        backend = USER_BACKEND if args.function else args.backend
        if backend is None:
            raise UserError("kernels check: give MODULE:FUNCTION or --backend NAME to check")
        results = conformance.check_backend(args.op, backend, dtypes=_dtypes(args.dtypes), device=args.device)
        print(conformance.report(results, failures_only=not args.verbose))
        return 0 if conformance.passed(results) else 1
    import torch

    dtype = _dtypes(args.dtype, "--dtype")[0]
    shape = None
    if args.shape:
        try:
            shape = tuple(int(s) for s in args.shape.split(","))
        except ValueError:
            raise UserError(f"--shape {args.shape}: expected comma-separated integers, e.g. 4,16,32,32") from None
        if any(s < 1 for s in shape):
            raise UserError(f"--shape {args.shape}: every size must be >= 1")
    rows = []
    for name in ops:
        providers = args.backends.split(",") if args.backends else list(dict.fromkeys([*kernels.backends(name), "compile"]))
        rows += timing.time_op(name, providers, shape or timing.bench_shape(name), dtype, args.device, repeat=args.repeat)
    print(f"device: {timing.device_name(args.device)}, torch {torch.__version__}")
    print(timing.table(rows))
    if args.csv:
        timing.append_csv(rows, args.csv)
        print(f"rows appended to {args.csv}")
    return 0
