"""The training configuration: a typed tree that hydra fills from conf/ and the command line.

Each field is documented where it is declared (here, or in the option classes the workers take:
`ModelOptions`, `LearnerOptions`, `LossOptions`, `OptimOptions`). Hydra merges conf/*.yaml into this
schema, so a misspelt key or a wrong type fails at start-up with the key's name; `validate` then
checks the rules that span fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gmai_rl.data.prompts import DEFAULT_SYSTEM_PROMPT
from gmai_rl.learner.worker import LearnerOptions, LossOptions, OptimOptions
from gmai_rl.models.loading import ModelOptions


@dataclass
class SyntheticDataConfig:
    """The embedded synthetic dataset (gmai_rl.data.synthetic), written when absent."""

    dir: str = "artifacts/synthetic"
    """Folder for train.jsonl, eval.jsonl, sft.jsonl and images/ (relative: to the working dir)."""
    n_train: int = 2000
    """Training questions, split evenly over the tasks."""
    n_eval: int = 400
    """Held-out questions; each task's count is rounded down to a multiple of its options."""
    seed: int = 0
    """Seed of the generator: the same seed writes byte-identical files."""
    tasks: list[str] = field(default_factory=lambda: ["modality"])
    """Task names from gmai_rl.data.synthetic.TASKS."""
    image_size: int = 56
    """Side of the square PNGs in pixels (56: 4 visual tokens for Qwen2.5-VL)."""
    shuffle_options: bool = False
    """Shuffle option order per question; a tiny model needs many more RL steps then."""
    sft_answers: str = "describe"
    """Cold-start records: "describe" (the image's finding, then a random letter: format and
    description learned, accuracy at chance), "random" (generic reasoning, random letter) or "true"
    (finding, matching option and gold letter: the task too)."""


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
    on_error: str = "raise"
    """Bad records: "raise" (stop, naming file and line) or "skip" (count and report them)."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System message asking for <think>...</think><answer>X</answer>; null sends none."""
    max_eval_items: int | None = None
    """Evaluate on the first N held-out items only (null: all)."""
    synthetic: SyntheticDataConfig | None = field(default_factory=SyntheticDataConfig)
    """Generate this synthetic dataset first when its folder lacks train.jsonl; null for real data."""


@dataclass
class VLLMConfig:
    """The vLLM engine of each rollout worker (rollout.backend=vllm); see gmai_rl.rollout.vllm."""

    tensor_parallel_size: int = 1
    """GPUs per engine; on GPU it must equal cluster.gpus_per_rollout_worker (the actor's bundle)."""
    distributed_executor_backend: str | None = None
    """null: vLLM's choice ("uni" for 1 GPU, "mp" worker processes inside the actor for TP > 1)."""
    gpu_memory_utilization: float = 0.85
    """Fraction of each GPU the engine may take for weights, activations and KV cache."""
    kv_cache_memory_mb: int | None = None
    """KV cache size; null: from gpu_memory_utilization on GPU, 256 MiB on CPU."""
    enable_sleep_mode: bool = False
    """GPU only: the engine can release its memory while the learners train (colocated runs)."""
    sleep_level: int = 1
    """1 offloads weights to host memory and drops the KV cache; 2 drops the weights too."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (reset after every weight update)."""
    dtype: str | None = None
    """Engine dtype (float32, bfloat16, float16); null: model.dtype."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens; null: the model config's (can be huge: set it)."""
    max_num_seqs: int | None = None
    """Sequences decoded together; null: vLLM's default."""
    enforce_eager: bool = False
    """Skip CUDA graph capture (faster start, slower decoding); CPU runs eager anyway."""
    logprobs_mode: str = "processed_logprobs"
    """Log-probs after temperature/top-p, which is what the learner computes (at top_p=1)."""
    images_per_prompt: int = 1
    """vLLM's limit_mm_per_prompt for images (vision-language models)."""
    multiprocessing: bool | None = None
    """Engine core in its own process; null: off on CPU (one process, fast start), on for GPU."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further vllm.LLM(...) keyword arguments, passed as given."""


@dataclass
class RolloutConfig:
    backend: str = "hf"
    """"hf" (transformers generate) or "vllm" (needs vLLM installed; options in rollout.vllm)."""
    samples_per_prompt: int = 8
    """n: completions per prompt, one GRPO group."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (the learner scores under the same one)."""
    top_p: float = 1.0
    """Nucleus sampling bound; 1 samples from the full distribution."""
    max_new_tokens: int = 64
    """Generation budget per completion; longer ones end with finish_reason "length"."""
    eval_temperature: float = 0.0
    """0 evaluates greedily."""
    device: str = "auto"
    """"auto" (cuda when the worker has a GPU), "cpu" or "cuda"."""
    torch_threads: int = 1
    """Intra-op threads per worker on CPU."""
    max_batch_prompts: int = 64
    """Prompts per generate call inside a worker (bounds memory)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class RewardConfig:
    fn: str | None = None
    """Dotted path of fn(completion, item) -> dict with "total"; null: the MCQ rule."""
    format_weight: float = 0.5
    """total = accuracy + format_weight * format (MCQ rule)."""
    num_workers: int = 1
    """Reward actors; completions are spread evenly over them."""


@dataclass
class AlgoConfig:
    estimator: str = "grpo"
    """Advantage estimator: grpo, drgrpo or rloo."""
    prompts_per_step: int = 16
    """Groups in each training batch (after filtering and refilling)."""
    accuracy_filter: bool = True
    """Drop groups whose mean accuracy is outside [filter_low, filter_high] (MM-EUREKA)."""
    filter_low: float = 0.1
    """Lowest group accuracy kept (inclusive)."""
    filter_high: float = 0.9
    """Highest group accuracy kept (inclusive)."""
    max_refill_rounds: int = 4
    """Extra generate rounds per step to replace filtered groups; then train on what was kept."""
    loss: LossOptions = field(default_factory=LossOptions)


@dataclass
class SFTConfig:
    enabled: bool = True
    """Run supervised fine-tuning on data.sft before RL (the paper's cold start)."""
    steps: int = 100
    """Optimizer steps of the cold start."""
    batch_size: int = 32
    """Samples per optimizer step, over all learner ranks."""
    optim: OptimOptions = field(default_factory=lambda: OptimOptions(lr=1e-3, total_steps=100))


@dataclass
class SyncConfig:
    bucket_mb: int = 256
    """Flat broadcast buckets of at most this size."""
    wire_dtype: str | None = None
    """dtype on the wire (e.g. bfloat16 for a bf16 rollout engine); null: the learner's."""
    verify: bool = False
    """After each sync, compare a checksum of every tensor on both sides (slow for big models)."""
    timeout_s: float = 600.0
    """A peer that does not answer within this fails the run with a clear error."""


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
    placement_strategy: str = "PACK"
    """Ray placement strategy for the bundles: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    num_cpus: int | None = None
    """CPUs a local ray.init() advertises; null: enough for every actor's bundle."""
    dashboard: bool = False
    """Start the Ray dashboard with a local ray.init()."""


@dataclass
class TrainerConfig:
    steps: int = 300
    """RL training steps (each: generate, reward, train, sync)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after RL)."""
    save_every: int = 0
    """Write an HF checkpoint every N steps (0: only at the end)."""
    save_final: bool = True
    """Write the final policy as an HF checkpoint to <output_dir>/final."""
    seed: int = 0
    """Seeds prompt order, SFT batches and the rollout workers' sampling."""
    output_dir: str = "${hydra:runtime.output_dir}"
    """Where metrics.jsonl, eval.json and checkpoints go."""


@dataclass
class TrainConfig:
    model: ModelOptions = field(default_factory=lambda: ModelOptions(path="???"))
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerOptions = field(default_factory=LearnerOptions)
    optim: OptimOptions = field(default_factory=lambda: OptimOptions(lr=3e-4))
    """The RL stage's optimizer schedule."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def validate(cfg: TrainConfig) -> None:
    """Cross-field rules, checked before anything starts; each error names the keys to change."""
    from gmai_rl.algo import AGG_MODES, ESTIMATORS, KL_ESTIMATORS
    from gmai_rl.learner.batching import check_batch_shape

    errors = []
    n = cfg.rollout.samples_per_prompt
    if n < 2:
        errors.append(f"rollout.samples_per_prompt={n}: a group advantage needs at least 2 samples")
    if cfg.algo.estimator not in ESTIMATORS:
        errors.append(f"algo.estimator={cfg.algo.estimator!r}: expected one of {ESTIMATORS}")
    loss = cfg.algo.loss
    if loss.loss_agg not in AGG_MODES:
        errors.append(f"algo.loss.loss_agg={loss.loss_agg!r}: expected one of {AGG_MODES}")
    if loss.loss_agg == "seq-mean-token-sum-norm" and not loss.norm_len:
        errors.append("algo.loss.loss_agg=seq-mean-token-sum-norm needs algo.loss.norm_len")
    if loss.kl_estimator not in KL_ESTIMATORS:
        errors.append(f"algo.loss.kl_estimator={loss.kl_estimator!r}: expected {KL_ESTIMATORS}")
    if not 0 <= cfg.algo.filter_low <= cfg.algo.filter_high <= 1:
        errors.append("algo.filter_low <= algo.filter_high must both lie in [0, 1]")
    if cfg.rollout.backend not in ("hf", "vllm"):
        errors.append(f"rollout.backend={cfg.rollout.backend!r}: expected 'hf' or 'vllm'")
    errors += _vllm_errors(cfg)
    if cfg.learner.zero_stage not in (0, 1, 2, 3):
        errors.append(f"learner.zero_stage={cfg.learner.zero_stage}: expected 0-3")
    if cfg.data.on_error not in ("raise", "skip"):
        errors.append(f"data.on_error={cfg.data.on_error!r}: expected 'raise' or 'skip'")
    for key in ("learner_ranks", "rollout_workers"):
        if getattr(cfg.cluster, key) < 1:
            errors.append(f"cluster.{key} must be >= 1")
    try:
        check_batch_shape(
            cfg.algo.prompts_per_step * n, cfg.cluster.learner_ranks, cfg.learner.num_minibatches
        )
    except ValueError as err:
        errors.append(f"algo.prompts_per_step x rollout.samples_per_prompt: {err}")
    if cfg.sft.enabled:
        if not cfg.data.sft:
            errors.append("sft.enabled needs data.sft")
        if cfg.sft.batch_size % cfg.cluster.learner_ranks:
            errors.append("sft.batch_size must divide evenly over cluster.learner_ranks")
    if errors:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))


def _vllm_errors(cfg: TrainConfig) -> list[str]:
    """The vLLM engine must fit the rollout actor's bundle (its GPUs are the engine's TP ranks)."""
    if cfg.rollout.backend != "vllm":
        return []
    tp, gpus = cfg.rollout.vllm.tensor_parallel_size, cfg.cluster.gpus_per_rollout_worker
    errors = []
    if tp < 1:
        errors.append(f"rollout.vllm.tensor_parallel_size={tp} must be >= 1")
    elif cfg.cluster.colocate and tp > 1:
        errors.append(
            f"rollout.vllm.tensor_parallel_size={tp}: a colocated engine shares one GPU with a "
            "learner rank; use tensor_parallel_size=1 or cluster.colocate=false"
        )
    elif gpus >= 1 and not cfg.cluster.colocate and tp != gpus:
        errors.append(
            f"rollout.vllm.tensor_parallel_size={tp} must equal "
            f"cluster.gpus_per_rollout_worker={gpus:g} (the engine's GPUs)"
        )
    return errors
