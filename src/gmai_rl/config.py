"""The training configuration: a typed tree that hydra fills from conf/ and the command line.

Every field is documented where it is declared (here, or in the option classes the actors take:
`ModelOptions`, `LearnerOptions`, `LossOptions`, `OptimOptions`, `VLLMOptions`). The defaults are
the demo's values; conf/ groups hold only what differs from them. Hydra merges conf/*.yaml into
this schema, so a misspelt key, a wrong type or a choice outside its set fails at start-up with
the key's name (and the allowed choices); `gmai_rl.config_checks.validate` then checks the rules
that span fields.

This module sits above the actors' option modules and below the cluster: the actors never import
it, they are built from the option objects it holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import II, OmegaConf

from gmai_rl.benchmarks.prompts import PromptStyle
from gmai_rl.data.prompts import DEFAULT_SYSTEM_PROMPT
from gmai_rl.learner.options import Estimator, LearnerOptions, LossOptions, OptimOptions
from gmai_rl.models.loading import Dtype, ModelOptions
from gmai_rl.rollout.options import Backend, Device, VLLMOptions
from gmai_rl.types import StrChoice


class SFTAnswers(StrChoice):
    """What the synthetic cold-start records answer."""

    describe = "describe"
    """The image's finding, then a random letter: format and description learned, accuracy at
    chance."""
    random = "random"
    """Generic reasoning, random letter."""
    true = "true"
    """Finding, matching option and gold letter: the task too."""
    name = "name"
    """Finding, then a random option's text and its letter ("This is CT, option B."), answered
    with that letter: meant to teach the format and the lookup of a letter from its option text
    for shuffled options, accuracy at chance. The tiny model did not learn the lookup in 120 SFT
    steps (benchmarks/RESULTS.md, the shuffled-options demo)."""
    check = "check"
    """Finding, then the options checked in a fixed order, text then letter ("X-ray is C: no. CT
    is A: yes."), "yes" at a random one, answered with its letter: the format and the letter
    lookup learned, accuracy at chance; RL learns which text the image is. For shuffled options
    (conf/experiment/demo_shuffled.yaml)."""


# What to do with a bad record: "raise" stops at the first one, naming file and line; "skip"
# counts and reports them and trains on the rest. Functional form: `raise` is a Python keyword.
OnError = StrChoice("OnError", {"raise": "raise", "skip": "skip"})  # type: ignore[call-arg]


# ------------------------------------------------------------------ the artifacts cache

CACHE_ENV = "GMAI_RL_CACHE"


def artifacts_cache(environ: Mapping[str, str], home: Path) -> Path:
    """Where the demo's built artifacts (tiny model, synthetic data) live: $GMAI_RL_CACHE, else
    $XDG_CACHE_HOME/gmai-rl, else ~/.cache/gmai-rl; never inside the checkout, which a Ray job
    runs from a temporary copy of."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser().absolute()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser().absolute() / "gmai-rl"
    return home / ".cache" / "gmai-rl"


def synthetic_key(settings: Mapping[str, Any]) -> str:
    """A folder name that differs whenever a setting of the generator differs (every key but
    `dir`), so runs with other settings never share a cached dataset: `n_train=2000,...`."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            return "+".join(text(v) for v in value)
        return str(value)

    # Keys first, values one by one: reading `dir` itself would resolve this very interpolation.
    return ",".join(f"{k}={text(settings[k])}" for k in settings if k != "dir")


def _cache_resolver(*parts: str) -> str:
    """${gmai_rl.cache:} is the cache folder, ${gmai_rl.cache:sub/dir} a folder inside it."""
    return str(artifacts_cache(os.environ, Path.home()).joinpath(*parts))


def _synthetic_dir_resolver(*, _parent_: Any) -> str:
    """${gmai_rl.synthetic_dir:} inside data.synthetic: the cache folder of these settings."""
    return _cache_resolver("synthetic", synthetic_key(_parent_))


OmegaConf.register_new_resolver("gmai_rl.cache", _cache_resolver, replace=True)
OmegaConf.register_new_resolver("gmai_rl.synthetic_dir", _synthetic_dir_resolver, replace=True)


class WandbMode(StrChoice):
    """How wandb.init runs (its `mode`)."""

    online = "online"
    """Stream to the W&B server as the run goes."""
    offline = "offline"
    """Write a local run folder only (no network); upload it later with `wandb sync`."""
    disabled = "disabled"
    """Every wandb call is a no-op."""


class ProgressMode(StrChoice):
    """How long phases (data preparation, SFT, RL steps, evaluation) show their progress."""

    auto = "auto"
    """Bars on a terminal; log lines otherwise (`ray job logs`, output sent to a file)."""
    bars = "bars"
    """tqdm bars on stderr, redrawn in place."""
    lines = "lines"
    """One log line with count, rate and ETA at most every dashboards.progress_interval_s."""
    off = "off"
    """None (the per-step log lines remain)."""


class PlacementStrategy(StrChoice):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


@dataclass
class SyntheticDataConfig:
    """The embedded synthetic dataset (gmai_rl.data.synthetic), written when absent."""

    dir: str = "${gmai_rl.synthetic_dir:}"
    """Folder for train.jsonl, eval.jsonl, sft.jsonl and images/; by default a folder of the
    artifacts cache ($GMAI_RL_CACHE, else ~/.cache/gmai-rl) named after the settings below."""
    n_train: int = 2000
    """Training questions, split evenly over the tasks."""
    n_eval: int = 400
    """Held-out questions; each task's count is rounded down to a multiple of its options."""
    seed: int = 0
    """Seed of the generator: the same seed writes byte-identical files."""
    tasks: list[str] = field(default_factory=lambda: ["modality"])
    """Task names from gmai_rl.data.synthetic.TASKS (modality: X-ray / CT / MRI / ultrasound
    from the image's layout, 4 options)."""
    image_size: int = 56
    """Side of the square PNGs in pixels (56: 4 visual tokens for Qwen2.5-VL)."""
    shuffle_options: bool = False
    """Shuffle option order per question, so the answer's letter moves: the policy must read the
    options. The demo's cold start then leaves RL at chance; conf/experiment/demo_shuffled.yaml
    has what it takes (sft_answers=check)."""
    sft_answers: SFTAnswers = SFTAnswers.describe
    """Cold-start records: describe, random, true, name or check (see SFTAnswers)."""


@dataclass
class DataConfig:
    root: str | None = None
    """A dataset folder other paths may refer to as ${data.root} (conf/data/gmai_reasoning10k.yaml)."""
    train: str = "${data.synthetic.dir}/train.jsonl"
    """RL prompts: a JSONL file (GMAI-Reasoning10K, MM-EUREKA or the plain form)."""
    eval: str | None = "${data.synthetic.dir}/eval.jsonl"
    """Held-out questions for accuracy before, during and after RL; null skips evaluation."""
    sft: str | None = "${data.synthetic.dir}/sft.jsonl"
    """SFT records (reasoning + answer) for the cold start; used when sft.enabled."""
    image_root: str | None = None
    """Folder that relative image paths resolve against; null: each JSONL's own folder."""
    on_error: OnError = OnError["raise"]  # type: ignore[valid-type,index]
    """Bad records: raise (stop, naming file and line) or skip (count and report them)."""
    image_check_cache: str | None = "${gmai_rl.cache:image-checks.json}"
    """A file recording the images that passed the load-time decode, keyed by path, size, mtime
    and ctime: a later load (a resume, a multirun's other jobs, an eval set sharing the images)
    decodes only new or changed ones. null decodes every image at every load."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System message asking for <think>...</think><answer>X</answer>; null sends none."""
    max_eval_items: int | None = None
    """Evaluate on the first N held-out items only (null: all)."""
    synthetic: SyntheticDataConfig | None = field(default_factory=SyntheticDataConfig)
    """Generate this synthetic dataset first when its folder lacks train.jsonl; null for real data."""


@dataclass
class RolloutConfig:
    backend: Backend = Backend.hf
    """Generation engine: hf (transformers generate) or vllm (options in rollout.vllm)."""
    samples_per_prompt: int = 8
    """n: completions per prompt, one GRPO group."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (the learner scores under the same one)."""
    top_p: float = 1.0
    """Nucleus sampling bound; the learner scores the untruncated distribution: keep 1 for
    training."""
    max_new_tokens: int = 48
    """Generation budget per completion; longer ones end with finish_reason "length". The demo's
    cold-start answers take ~30 tokens."""
    eval_temperature: float = 0.0
    """0 evaluates greedily."""
    device: Device = Device.auto
    """auto (cuda when the worker has a GPU), cpu or cuda."""
    torch_threads: int = 1
    """Intra-op threads per worker on CPU."""
    max_batch_prompts: int = 64
    """Prompts per generate call inside a worker (bounds memory)."""
    vllm: VLLMOptions = field(default_factory=VLLMOptions)


@dataclass
class RewardConfig:
    fn: str | None = None
    """Dotted path of fn(completion, item) -> dict with "total"; null: the MCQ rule."""
    timeout_s: float = 300.0
    """Longest wait for one reward worker's batch of a rollout. A worker that takes longer (a
    reward function that hangs) is replaced, and that batch's completions count as failed
    (reward 0, `reward_failures`)."""
    format_weight: float = 0.5
    """total = accuracy + format_weight * format (MCQ rule)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (gmai_rl.reward.overlong): over the last overlong_buffer
    tokens of rollout.max_new_tokens the reward falls linearly by up to overlong_penalty, all of
    it at the limit; logged as "overlong". 0: off (DAPO used 4096 of 20480 tokens)."""
    overlong_penalty: float = 1.0
    """The largest length penalty (>= 0), taken by a completion cut at rollout.max_new_tokens."""
    num_workers: int = 1
    """Reward actors; completions are spread evenly over them."""


@dataclass
class AlgoConfig:
    estimator: Estimator = Estimator.grpo
    """Advantage estimator: grpo, drgrpo or rloo (gmai_rl.algo.advantages)."""
    max_staleness: int = 0
    """0: the synchronous loop (generate, score, train, push, each waiting for the last). s > 0:
    the rollout workers collect the batches of the next s steps while the learners train, so a
    batch is trained on by a policy up to s weight pushes newer than the one that generated it
    (gmai_rl.algo.staleness; never more: checked every step, `staleness_max`). Pair it with
    `algo.loss.behaviour_is_cap` for the off-policy correction."""
    prompts_per_step: int = 16
    """Groups in each training batch (after filtering and refilling)."""
    accuracy_filter: bool = False
    """Drop groups whose mean accuracy is outside [filter_low, filter_high] (MM-EUREKA's online
    filter). Off in the demo: it costs extra rollouts once the tiny model is mostly right, and
    GRPO already gives all-right and all-wrong groups zero advantage."""
    filter_low: float = 0.1
    """Lowest group accuracy kept (inclusive)."""
    filter_high: float = 0.9
    """Highest group accuracy kept (inclusive)."""
    max_refill_rounds: int = 4
    """Extra generate rounds per step to replace filtered groups (and prompts dropped for images
    unreadable since the load); then train on what was kept, padded to a full batch."""
    loss: LossOptions = field(
        default_factory=lambda: LossOptions(temperature=II("rollout.temperature"))
    )


@dataclass
class SFTConfig:
    enabled: bool = True
    """Run supervised fine-tuning on data.sft before RL (the paper's cold start)."""
    steps: int = 120
    """Optimizer steps of the cold start."""
    batch_size: int = 32
    """Samples per optimizer step, over all learner ranks."""
    optim: OptimOptions = field(default_factory=lambda: OptimOptions(lr=3e-3, warmup_steps=5))
    """The demo's tiny model needs ~100 steps at 3e-3 to sample the format ~90% of the time at
    temperature 1; a decayed cold start left RL stuck at chance (seed 0), so the rate is
    constant after warmup."""


@dataclass
class SynthConfig:
    """Rejection sampling in the rounds after the first (`trainer.rounds`, gmai_rl.synth): the
    policy samples k traces per question of the train split on the rollout workers, the reward
    workers score them, the finished, well-formed, correct, distinct ones become SFT data."""

    k: int = 4
    """Samples per question."""
    keep_per_question: int = 1
    """Distinct kept traces per question, at most."""
    temperature: float = 1.0
    """Sampling temperature of the traces."""
    max_new_tokens: int | None = None
    """Longer traces are rejected (too_long); null: rollout.max_new_tokens."""
    min_accuracy: float = 0.0
    """Keep a question's traces only when its group's accuracy is at least this..."""
    max_accuracy: float = 1.0
    """... and at most this (below 1: only questions the policy gets wrong sometimes)."""
    max_items: int | None = None
    """Questions sampled per round (the train split's first, in order); null: all of them."""
    sft_steps: int | None = None
    """Optimizer steps of the round's SFT on the kept traces (sft.batch_size, sft.optim);
    null: sft.steps."""


@dataclass
class SyncConfig:
    bucket_mb: int = 256
    """Flat broadcast buckets of at most this size."""
    wire_dtype: Dtype | None = None
    """dtype on the wire (e.g. bfloat16 for a bf16 rollout engine); null: the learner's."""
    verify: bool = False
    """After each sync, compare a checksum of every tensor on both sides (slow for big models)."""
    timeout_s: float = 600.0
    """A sync-group peer that does not answer within this fails the run with a clear error."""
    max_buckets_in_flight: int = 2
    """Buckets learner rank 0 may have sent but not yet seen arrive, each holding a flat buffer
    on its device (NCCL sends return before the data moves): 1 waits for every bucket, 2
    overlaps the next bucket's gather with the current transfer."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address; null: a local ray.init() (or the cluster of `ray job submit`)."""
    learner_ranks: int = 2
    """Data-parallel DeepSpeed ranks, one Ray actor each."""
    rollout_workers: int = 2
    """Generation engines, one Ray actor each; prompts are spread evenly over them."""
    gpus_per_learner: float = 0
    """0 runs the learner on CPU with gloo; 1 gives each rank a GPU (NCCL)."""
    gpus_per_rollout_worker: float = 0
    """0 generates on CPU; with vLLM, the tensor-parallel size."""
    cpus_per_actor: float = 1
    """CPU resources of each learner rank and rollout worker bundle."""
    colocate: bool = False
    """Learner ranks and rollout workers share bundles (GPU: fractional GPUs per actor)."""
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    """Ray placement strategy for the bundles: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    num_cpus: int | None = None
    """CPUs a local ray.init() advertises; null: enough for every actor's bundle."""
    dashboard: bool = False
    """Start the Ray dashboard with a local ray.init()."""
    metrics_export_port: int | None = None
    """Port of the Prometheus endpoint (Ray's and this run's metrics) with a local ray.init();
    null: a free one (logged at start). On a cluster: `ray start --metrics-export-port`."""
    gpus_per_node: int | None = 8
    """GPUs on each node, for the pre-flight plan's placement check (`gmai-rl plan`); null: the
    driver's own (torch.cuda), which is right for a local ray.init() on a GPU node."""
    gpu_memory_gib: float | None = 79.18
    """Memory of each GPU in GiB, for the plan's memory checks, as torch and vLLM see it (vLLM
    sizes its share from the device's total): 79.18 is what an "80 GB" H100 reports (A100 80GB:
    ~79.2-79.3), not a nominal 80. null: the driver's first GPU (torch.cuda). Unknown (null on
    a driver without a GPU): the GPU memory checks are skipped and the plan says so."""
    check_resources: bool = True
    """Before creating anything, stop when the cluster as it is cannot hold the placement group
    and the reward workers, naming what is missing. false on an autoscaling cluster that adds
    nodes on demand (then only cluster.start_timeout_s bounds the wait)."""
    start_timeout_s: float = 1800.0
    """Longest wait for the placement group and each actor's start (model loading, DeepSpeed
    init); exceeded, the run stops naming what did not start and what the cluster has free."""
    call_timeout_s: float = 1800.0
    """Longest wait for one stage's remote calls (generate, score, train, weight sync, save);
    exceeded, the run stops naming the stage and the actors that did not answer."""
    max_restarts: int = 3
    """Worker replacements allowed within restart_window_s, rollout and reward workers together;
    one more stops the run (a crash loop). A rollout worker that dies while generating is
    replaced in its bundle, the weight-sync group re-formed with it, the current weights pushed
    and checked, and its prompts generated again; a reward worker that dies is replaced and its
    batch scored again, one that hangs past reward.timeout_s is replaced and its batch counted
    as failed. 0: any death stops the run."""
    restart_window_s: float = 3600.0
    """The window max_restarts counts in."""


@dataclass
class TrainerConfig:
    steps: int = 120
    """RL training steps (each: generate, reward, train, sync). The demo's 120 keep a fresh
    machine under 10 min; 150 reach ~100% held-out accuracy on seeds 0-2."""
    rounds: int = 1
    """The paper's iterative recipe as one run: round 1 is the SFT cold start (sft.enabled) and
    trainer.steps of RL; each later round rejection-samples traces from the policy (`synth`),
    fine-tunes the policy on the kept ones (it continues from the current weights), then runs
    trainer.steps of RL again. Every round is evaluated before and after its RL; its data and
    evaluation go to <output_dir>/round-<r>/, its records carry "round"."""
    eval_every: int = 100
    """Evaluate every N steps (0: only before and after RL)."""
    save_every: int = 50
    """Write a resumable checkpoint (gmai_rl.checkpoint) every N RL steps and after the last
    one, into <output_dir>/checkpoints; 0 writes none."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept: older ones are deleted once a newer one is complete."""
    resume: str | None = None
    """Continue a run: "auto" (the latest complete checkpoint in output_dir; a fresh start when
    there is none) or a checkpoint folder; null starts fresh (refused when output_dir already
    holds checkpoints, so that nothing is overwritten by accident)."""
    save_final: bool = True
    """Write the final policy as an HF checkpoint to <output_dir>/final."""
    seed: int = 0
    """Seeds prompt order, SFT batches, the learner ranks and the rollout workers' sampling."""
    output_dir: str = "${hydra:runtime.output_dir}"
    """Where metrics.jsonl, eval.json and checkpoints go: hydra's run folder by default
    (outputs/<date>/<time>, multirun/<date>/<time>/<n>). Under `ray job submit` it must be an
    absolute path outside the job's temporary working directory (shared storage on a multi-node
    cluster); launch/submit.sh sets one."""


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log every metrics.jsonl record to Weights & Biases (off in the demo)."""
    project: str = "gmai-rl"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; null: the account's default."""
    mode: WandbMode | None = None
    """online, offline (a run folder under <output_dir>/wandb, no network; `wandb sync` it
    later) or disabled; null: wandb's own default (the WANDB_MODE variable, else online)."""
    group: str | None = None
    """Groups runs in the W&B UI, e.g. the jobs of one sweep; null: none."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run."""


@dataclass
class DashboardsConfig:
    """Where a run's metrics are shown besides metrics.jsonl (always written, the source of
    truth), and the end-of-run report."""

    run_name: str | None = None
    """The run's name on every dashboard (the W&B run name, the Ray metrics' `run` tag); null:
    the output folder's name, "<sweep time>/<job number>" for a hydra multirun job."""
    tensorboard: bool = True
    """TensorBoard event files in <output_dir>/tensorboard (`tensorboard --logdir <output_dir>`)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray_metrics: bool = True
    """Export step, reward, accuracy, tokens/s, per-stage seconds and policy-version lag through
    Ray's metrics system (ray.util.metrics): each node's Prometheus endpoint, hence the cluster's
    Prometheus/Grafana and the Ray dashboard's metrics view."""
    progress: ProgressMode = ProgressMode.auto
    """Progress of long phases with ETA: auto, bars, lines or off (see ProgressMode)."""
    progress_interval_s: float = 30.0
    """Least seconds between two progress lines of a phase (lines mode); its last line is
    always written."""
    report: bool = True
    """At the end of the run: report.png (reward, accuracy, response length, KL and entropy
    curves) and report.md (configuration, held-out accuracy before/after per modality, time
    split), beside metrics.jsonl."""


@dataclass
class BenchmarkSource:
    """One benchmark in its published format (docs/evaluation.md)."""

    name: str = "???"
    """gmai-mmbench, omnimedvqa, vqa-rad, slake, path-vqa, pmc-vqa, mmmu-med, medxpertqa-mm or
    vlmeval-mcq (`gmai_rl.benchmarks.loaders.BENCHMARKS`)."""
    path: str = "???"
    """Its file or folder on the driver's machine (local files only: nothing is downloaded)."""
    max_items: int | None = None
    """Evaluate the first N questions only; null: all."""


@dataclass
class EvalConfig:
    """Medical benchmarks evaluated with the held-out set: before and after RL and every
    `trainer.eval_every` steps, generated on the rollout workers, scored by the rules of
    `gmai_rl.benchmarks.scoring`."""

    benchmarks: list[BenchmarkSource] = field(default_factory=list)
    prompt_style: PromptStyle = PromptStyle.TRAINED
    """trained: the <think>/<answer> format the policy learnt; harness: VLMEvalKit's MCQ prompt
    and LLaVA-1.5's short-answer prompt (`gmai_rl.benchmarks.prompts`)."""
    judge: str | None = None
    """package.module:function that scores open questions (`benchmarks.scoring.load_judge`);
    null: exact match and token F1 only."""
    cache_dir: str | None = None
    """Where images decoded from the benchmark files are kept; null: beside each file."""


@dataclass
class TrainConfig:
    model: ModelOptions = field(default_factory=lambda: ModelOptions(path="???"))
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerOptions = field(default_factory=lambda: LearnerOptions(seed=II("trainer.seed")))
    optim: OptimOptions = field(default_factory=OptimOptions)
    """The RL stage's optimizer schedule."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dashboards: DashboardsConfig = field(default_factory=DashboardsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def rl_optim(self) -> OptimOptions:
        """The RL stage's schedule, decaying over all of its optimizer steps unless set."""
        return self.optim.for_stage(self.trainer.steps * self.learner.optimizer_steps_per_batch)

    @property
    def sft_optim(self) -> OptimOptions:
        return self.sft.optim.for_stage(self.sft.steps)
