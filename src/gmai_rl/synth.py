"""`gmai-rl synth`: rejection sampling into SFT records (gmai_rl.rejection), in one process (HF
generate, the MCQ rule) or, with `--ray`, on a generation cluster: the rollout workers of the
training config the overrides describe generate, its reward workers score (`reward.fn`'s
breakdowns must hold "format" and "accuracy", as the default rule's do).

    gmai-rl synth --model CKPT --data train.jsonl --out synth.jsonl --k 8
    gmai-rl synth ... --ray rollout=vllm cluster.rollout_workers=4 cluster.gpus_per_rollout_worker=1

The output is GMAI-Reasoning10K `reasoning_mcq_sft` JSONL (absolute image paths), so
`load_mcq_jsonl` and the trainer's SFT stage read it back directly; started again on the same
--out it resumes. Iterating sample -> SFT -> RL -> sample as one run: `trainer.rounds`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gmai_rl.data.admission import add_on_error_argument
from gmai_rl.data.trained_prompt import add_system_prompt_arguments, system_prompt_for
from gmai_rl.rejection import (
    Filters,
    SynthOutput,
    provenance,
    rejection_sample,
    sample_on_cluster,
    write_all,
)
from gmai_rl.types import SamplingParams

if TYPE_CHECKING:
    from gmai_rl.config import TrainConfig


# --------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="policy checkpoint (HF folder or hub name)")
    parser.add_argument("--data", required=True, help="questions JSONL (any supported format)")
    parser.add_argument("--out", required=True, help="SFT JSONL to write (or resume)")
    parser.add_argument("--k", type=int, default=8, help="samples per question")
    parser.add_argument("--keep-per-question", type=int, default=1)
    parser.add_argument("--min-accuracy", type=float, default=0.0, help="of a question's group")
    parser.add_argument(
        "--max-accuracy",
        type=float,
        default=1.0,
        help="of a question's group; below 1 keeps only questions the policy gets wrong sometimes",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longer traces: too_long")
    parser.add_argument("--max-items", type=int, default=None)
    add_system_prompt_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="questions per batch (one process)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_on_error_argument(parser)


def run(args: argparse.Namespace, ray: TrainConfig | None = None) -> int:
    """`gmai-rl synth`; `ray`: generate and score on a generation cluster of this training
    config (`gmai-rl synth --ray OVERRIDES`) instead of in this process."""
    from gmai_rl.data import load_mcq_jsonl

    filters = Filters(args.k, args.keep_per_question, args.min_accuracy, args.max_accuracy)
    system, whose = system_prompt_for(args.model, args.system_prompt, args.no_system_prompt)
    print(f"system prompt: {whose}", file=sys.stderr)
    sampling = SamplingParams(args.temperature, args.top_p, args.max_new_tokens, seed=args.seed)
    # policy version 0: the checkpoint's own weights (a synth pushes none)
    made = provenance(
        str(args.model),
        0,
        args.data,
        sampling,
        filters,
        args.max_items,
        system,
        generated_by="ray" if ray is not None else "one process (HF)",
    )
    output = SynthOutput(args.out, made)
    questions = load_mcq_jsonl(args.data, on_error=args.on_error)
    if not questions:
        raise SystemExit(f"gmai-rl synth: no question loaded from {args.data}")
    items = [i for i in questions[: args.max_items] if i.id not in output.done]

    if ray is not None:
        from gmai_rl.cluster.cluster import generation_cluster

        with generation_cluster(ray) as cluster:
            stats = sample_on_cluster(cluster, ray, items, sampling, system, filters, output)
    else:
        from gmai_rl.config import DashboardsConfig
        from gmai_rl.models.loading import ModelOptions
        from gmai_rl.rollout.hf import HFEngine

        engine = HFEngine(ModelOptions(args.model))
        batches = rejection_sample(
            engine.generate, items, sampling, system, filters, args.batch_size
        )
        stats = write_all(batches, output, DashboardsConfig(), len(items))
    print(f"{stats.line()} -> {output.out}")
    for modality, counts in sorted(stats.by_modality.items()):
        print(f"  {modality}: {dict(counts)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gmai-rl synth", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
