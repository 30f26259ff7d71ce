"""`gmai-rl make-data OUT ...`: the argument parsing for `write_synthetic_dataset`, kept apart so the
top-level CLI can mount it as a subcommand (`add_arguments` + `run`) or call `main(argv)`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gmai_rl.data.synthetic.tasks import TASKS
from gmai_rl.data.synthetic.writer import DEFAULT_TASKS, write_synthetic_dataset


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("out", help="output folder (created; our files in it are overwritten)")
    parser.add_argument("--n-train", type=int, default=2000, help="train items, all tasks")
    parser.add_argument("--n-eval", type=int, default=400, help="held-out items, all tasks")
    parser.add_argument("--n-sft", type=int, default=None, help="SFT records (default: n-train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated, from: {', '.join(TASKS)}",
    )
    parser.add_argument("--image-size", type=int, default=56, help="side in pixels (56, 112, 224)")
    parser.add_argument(
        "--shuffle-options",
        action="store_true",
        help="shuffle option order per question (default: a fixed order per task)",
    )
    parser.add_argument(
        "--sft-answers",
        choices=("true", "random", "describe", "name", "check"),
        default="true",
        help="true: reasoning + gold letter; random: generic reasoning + random letter "
        "(teaches the format only); describe: the image finding + random letter; name: the "
        "finding, a random option's text and its letter; check: the finding, then the options "
        "checked in a fixed order until a random one gets 'yes', answered with its letter",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    paths = write_synthetic_dataset(
        args.out,
        n_train=args.n_train,
        n_eval=args.n_eval,
        n_sft=args.n_sft,
        seed=args.seed,
        tasks=[task.strip() for task in args.tasks.split(",") if task.strip()],
        image_size=args.image_size,
        shuffle_options=args.shuffle_options,
        sft_answers=args.sft_answers,
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmai-rl make-data", description="Write the synthetic medical MCQ dataset."
    )
    return run(add_arguments(parser).parse_args(argv))
