"""The pre-flight plan: what a configuration puts on each GPU, worked out before anything loads.

    plan = make_plan(cfg)     # reads the model's config only: parameters counted on the meta device
    print(render(plan))       # the table `gmai-rl plan` prints and every run logs first
    problems = check(plan)    # what cannot fit, each with its numbers and the keys to change

Estimated: a learner rank's model states under its ZeRO stage, precision and offload (following
what DeepSpeed 0.19.8 allocates for the config `learner.deepspeed_config` writes; the unit tests
compare them with DeepSpeed's own estimators), the KL reference, the rollout engine's weights and
KV cache, the prompt length against the engine's window, and whether the placement group's bundles
fit the nodes. Not estimated: activations (they depend on batch, sequence lengths, gradient
checkpointing and the attention kernel), DeepSpeed's communication buckets and the CUDA context;
the plan says so and reports the memory left for them.

The rollout engine's part (its memory, its rows of the table, why it cannot fit its GPU, its
notes) and its window come from the engine's spec (`rollout.engines`): this package names no
engine. Read in this order; each file is one room:

    memory.py    a learner rank's model states and the KL reference, in bytes (pure)
    model.py     `read_model`: the model's facts from its config (the only part that touches
                 transformers: a model built on the meta device, no weights, no download beyond
                 the config)
    nodes.py     `hardware`: the nodes the plan checks against; the nodes the bundles take
    prompt.py    `prompt_budget`: the longest prompt and sequence, measured or assumed
    make.py      `Plan` and `make_plan`: the parts put together, the engine's from its spec
    problems.py  `check`: what cannot fit or cannot start
    table.py     `render`: the table

The driver and `gmai-rl plan` use the three names above, imported from here; the package loads
no Ray (`cluster.placement` is its pure arithmetic).
"""

from gmai_rl.plan.make import Plan, make_plan
from gmai_rl.plan.memory import Memory, ParamCounts
from gmai_rl.plan.model import ModelFacts, read_model
from gmai_rl.plan.nodes import Hardware, hardware
from gmai_rl.plan.problems import check
from gmai_rl.plan.table import render

__all__ = [
    "Hardware",
    "Memory",
    "ModelFacts",
    "ParamCounts",
    "Plan",
    "check",
    "hardware",
    "make_plan",
    "read_model",
    "render",
]
