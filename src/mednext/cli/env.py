"""``mednext env``: the shell lines that let nnU-Net's own commands work on mednext's folders."""

from __future__ import annotations

import argparse
import shlex


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "env",
        help="print the nnUNet_* variables for nnU-Net's own commands on this working folder",
        description="Print export lines for nnU-Net v2's folder variables of --workdir and for its trainer "
        "search (nnUNet_extTrainer), so that nnUNetv2_find_best_configuration, nnUNetv2_ensemble, "
        "nnUNetv2_predict -tr MedNeXtTrainer_Sk3 ... work on MedNeXt results. Use it as: "
        'eval "$(mednext env --workdir W)"',
    )
    p.add_argument("--workdir", default=None, help="working folder of plan/train (default ./mednext_work)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mednext.pipeline.workdir import engine_environment

    for name, value in engine_environment(args.workdir).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0
