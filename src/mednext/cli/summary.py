"""``mednext summary``: per-stage table, parameters, MACs and training-step memory of a preset."""

from __future__ import annotations

import argparse
import json


def _size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 128 or 128x128x128") from err


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-stage table, parameters, MACs and training-step memory of a preset")
    p.add_argument("--model", default="S", help="preset S, B, M, L, v2-base or v2-wide (default S)")
    p.add_argument("--kernel", type=int, default=3, help="depthwise kernel size (default 3)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2D or 3D network (default 3)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=4, help="output classes incl. background (default 4)")
    p.add_argument("--no-deep-supervision", action="store_true", help="count only the full-resolution head")
    p.add_argument(
        "--size", type=_size, default=None, help="input size for MACs, e.g. 128 or 128x128x128 (default 128)"
    )
    p.add_argument("--memory", action="store_true", help="also measure one training step's peak memory")
    p.add_argument(
        "--batch",
        type=int,
        default=2,
        help="batch size of the saved activations and the memory measurement (default 2)",
    )
    p.add_argument("--patch", type=_size, default=None, help="patch of the memory measurement (default: --size)")
    p.add_argument("--device", default="cpu", help="device of the memory measurement: cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _expand(size: tuple[int, ...] | None, dims: int) -> tuple[int, ...] | None:
    if size is None:
        return None
    if len(size) == 1:
        return size * dims
    if len(size) != dims:
        raise ValueError(f"size {'x'.join(map(str, size))} has {len(size)} axes; a {dims}D network needs 1 or {dims}")
    return size


def run(args: argparse.Namespace) -> int:
    from mednext.nn.summary import model_summary

    summary = model_summary(
        args.model,
        kernel_size=args.kernel,
        spatial_dims=args.dims,
        in_channels=args.in_channels,
        num_classes=args.classes,
        input_size=_expand(args.size, args.dims),
        deep_supervision=not args.no_deep_supervision,
        memory_batch=args.batch if args.memory else None,
        memory_patch=_expand(args.patch, args.dims),
        device=args.device,
    )
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 0
