"""`gmai-rl`: the command-line front door.

gmai-rl train [hydra overrides ...]     GRPO on Ray (same as python -m gmai_rl.train)
gmai-rl plan [hydra overrides ...]      pre-flight plan: memory per GPU, prompt budget, placement
gmai-rl make-tiny-model OUT             offline tiny Qwen2.5-VL with processor and chat template
gmai-rl make-data OUT [...]             the synthetic medical MCQ dataset
gmai-rl synth --model M --data D ...    rejection sampling into SFT records (--ray [OVERRIDES]: on
                                        a Ray cluster's rollout and reward workers)
gmai-rl eval --model M --data D         held-out accuracy of a checkpoint; --benchmark NAME for
                                        medical benchmarks, --ray [OVERRIDES] on a Ray cluster
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gmai_rl.config import TrainConfig


def _make_tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder to write the model and processor to")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from gmai_rl.models.tiny import make_tiny_model

    path = make_tiny_model(
        args.out,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        vision_depth=args.vision_depth,
        seed=args.seed,
    )
    print(path)
    return 0


def _train(argv: Sequence[str]) -> int:
    from gmai_rl.train import main as train_main

    # Hydra parses sys.argv itself.
    sys.argv = ["gmai-rl train", *argv]
    train_main()
    return 0


def _plan(argv: Sequence[str]) -> int:
    """Print the pre-flight plan of the config `train` would run; 1 when it cannot fit. The
    prompt budget is measured on the data when its files are there, else assumed."""
    from pathlib import Path

    from gmai_rl.config_checks import validate
    from gmai_rl.feed import load_datasets
    from gmai_rl.plan import check, make_plan, render
    from gmai_rl.train import compose

    cfg = compose(list(argv))
    try:
        validate(cfg)
    except ValueError as err:
        print(err)
        return 1
    items = None
    d = cfg.data
    wanted = [d.train, d.eval, d.sft if cfg.sft.enabled else None]
    if all(Path(path).exists() for path in wanted if path):
        data = load_datasets(cfg)
        items = [*data.train, *data.eval]
    plan = make_plan(cfg, items=items)
    print(render(plan))
    problems = check(plan)
    if problems:
        print("\nthe configuration cannot fit:\n  " + "\n  ".join(problems))
        return 1
    return 0


def _add_ray(parser: argparse.ArgumentParser, work: str) -> None:
    parser.add_argument(
        "--ray",
        nargs="*",
        metavar="OVERRIDE",
        default=None,
        help=f"{work} on a Ray cluster's workers instead (a local one, or cluster.address / "
        "RAY_ADDRESS), set up as a training config with these hydra overrides would (e.g. "
        "rollout=vllm cluster.rollout_workers=4 cluster.gpus_per_rollout_worker=1)",
    )


def _ray_config(args: argparse.Namespace) -> TrainConfig | None:
    """The training config `--ray OVERRIDES` describes for the checkpoint --model; None without
    --ray."""
    if args.ray is None:
        return None
    from gmai_rl.train import compose

    return compose([*args.ray, f"model.path={args.model}", "model.build_tiny_if_missing=false"])


def _eval(args: argparse.Namespace) -> int:
    from gmai_rl import evaluate

    return evaluate.run(args, _ray_config(args))


def _synth(args: argparse.Namespace) -> int:
    from gmai_rl import synth

    return synth.run(args, _ray_config(args))


def build_parser() -> argparse.ArgumentParser:
    from gmai_rl import evaluate, synth
    from gmai_rl.data.synthetic import cli as synthetic_cli

    parser = argparse.ArgumentParser(prog="gmai-rl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="GRPO on Ray; the rest of the line goes to hydra")
    commands.add_parser(
        "plan", help="pre-flight plan of a training config; the rest of the line goes to hydra"
    )
    tiny = commands.add_parser("make-tiny-model", help="write an offline tiny Qwen2.5-VL")
    _make_tiny_model_arguments(tiny)
    tiny.set_defaults(run=_make_tiny_model)
    data = commands.add_parser("make-data", help="write the synthetic medical MCQ dataset")
    synthetic_cli.add_arguments(data)
    data.set_defaults(run=synthetic_cli.run)
    rs = commands.add_parser("synth", help="rejection sampling into SFT records")
    synth.add_arguments(rs)
    _add_ray(rs, "generate and score")
    rs.set_defaults(run=_synth)
    ev = commands.add_parser("eval", help="held-out accuracy of a checkpoint")
    evaluate.add_arguments(ev)
    _add_ray(ev, "generate")
    ev.set_defaults(run=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _train(argv[1:])
    if argv and argv[0] == "plan":
        return _plan(argv[1:])
    args = build_parser().parse_args(argv)
    from gmai_rl.data import DataError

    # What a load skipped and each benchmark's line are logged; a bare command shows them.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.run(args))
    except DataError as error:
        print(f"gmai-rl {args.command}: {error}", file=sys.stderr)
        if getattr(args, "on_error", None) == "raise":
            print("  (--on-error skip loads the rest and counts what it skips)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
