"""`sid-fast pretrain [--steps N --preset base ...]`: train the ShapesWorld teacher with flow matching.

  sid-fast pretrain --out-dir runs/shapes-teacher --steps 12000 --eval-prompts 200
  (rerun the same command to resume; then copy runs/shapes-teacher/teacher.safetensors to
   sid_fast/assets/shapes/teacher.safetensors to ship it; docs/shapes.md)
"""

from __future__ import annotations

import dataclasses


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring literal under it in the dataclass source."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def add_arguments(parser) -> None:
    from sid_fast.shapes.pretrain import PretrainConfig

    docs = field_docs(PretrainConfig)
    for field in dataclasses.fields(PretrainConfig):
        doc = docs.get(field.name, "")
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=f"{doc} (default: {field.default})")
    parser.add_argument("--eval-prompts", type=int, default=0,
                        help="after training, score the teacher on this many held-out one- and two-object prompts")
    parser.add_argument("--eval-steps", default="1,4,28", help="Euler step counts to score (comma-separated)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the scored samplers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    if args.overrides:
        raise ValueError(f"pretrain takes options, not config overrides; got {args.overrides}")
    from sid_fast.shapes.pretrain import PretrainConfig, evaluate_and_card, pretrain

    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    path = pretrain(config, progress=not args.no_progress)
    print(f"teacher written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.eval_prompts:
        steps = tuple(int(k) for k in args.eval_steps.split(","))
        scores = evaluate_and_card(config, path, args.eval_prompts, steps, args.guidance, progress=not args.no_progress)
        for (name, prompts), value in scores.items():
            print(f"{name:<28} {prompts}: {value}")
    return 0
