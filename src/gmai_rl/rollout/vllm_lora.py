"""LoRA adapters on a vLLM engine: each push becomes a new adapter version that requests name.

The base weights stay as vLLM loaded them from model.path (the learners' base, never trained).
A push carries only the adapters' tensors; the rollout worker receives them in its own process
(one sync-group member per engine, whatever its tensor parallelism, since the tensors are small)
and hands them here. `AdapterVersions.load` writes them as a PEFT adapter folder and names it in
a new `LoRARequest` (a new id each time: ids are vLLM's cache keys): vLLM 0.32.0's public way
in, `LLM.generate(..., lora_request=...)`, which loads the folder on its first use in every worker
(`lora/worker_manager.py` `_load_adapter` -> `LoRAModel.from_local_checkpoint`, sharded for
tensor parallelism by vLLM itself). The previous version is removed from the engine
(`remove_lora`) and from disk. Until the first push, requests run on the base, which is what
fresh adapters compute (lora_B = 0).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gmai_rl.models.loading import ModelOptions
from gmai_rl.models.lora import peft_config
from gmai_rl.rollout.options import max_lora_rank


def lora_engine_kwargs(rank: int) -> dict[str, Any]:
    """vLLM engine arguments that serve adapters of `rank`: one adapter in a batch (every request
    names the current version), the previous one kept on the CPU side until it is removed."""
    return {
        "enable_lora": True,
        "max_lora_rank": max_lora_rank(rank),
        "max_loras": 1,
        "max_cpu_loras": 2,
    }


def peft_file_name(param_name: str) -> str:
    """A PEFT parameter name (`...q_proj.lora_A.default.weight`) as PEFT saves it (without the
    adapter's name: `...q_proj.lora_A.weight`), which is what vLLM parses."""
    for part in (".lora_A.", ".lora_B."):
        head, sep, tail = param_name.partition(part)
        if sep:
            return f"{head}{part}{tail.split('.', 1)[1]}"
    raise ValueError(f"{param_name!r} is not a LoRA adapter parameter (lora_A / lora_B)")


class AdapterVersions:
    """The adapter versions one vLLM engine has been given, and the current one's request."""

    def __init__(self, model: ModelOptions) -> None:
        """For `model`'s adapters: `model.lora`'s, or those of the exported adapter folder that
        `model.path` names (served from the start: `gmai-rl eval --model final`, or a LoRA run
        that goes on training an exported adapter, whose own rank and targets hold)."""
        from peft import LoraConfig

        exported = model.path if model.weights_path != model.path else None
        self.config = LoraConfig.from_pretrained(exported) if exported else peft_config(model.lora)
        self.config.base_model_name_or_path = model.weights_path
        self.rank = int(self.config.r)
        self.root = Path(tempfile.mkdtemp(prefix="gmai-rl-adapters-"))
        # The folder (the current adapter's files) goes when the engine does.
        weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)
        self.request: Any = None
        """The current version's `LoRARequest`; None: the base (no push yet)."""
        self.tensors: dict[str, torch.Tensor] = {}
        """The current version's tensors as received, by parameter name (checksums)."""
        self.loaded = 0
        """Adapters loaded so far: the next one's id. Not the policy version, which a re-push
        of unchanged weights sets back, while vLLM needs an id per distinct adapter."""
        if exported:
            from vllm.lora.request import LoRARequest

            self.loaded = 1
            self.request = LoRARequest("exported", 1, str(Path(exported).resolve()))

    def load(self, weights: Iterable[tuple[str, torch.Tensor]], version: int, llm: Any) -> int:
        """Make `weights` (PEFT parameter names) the adapters of policy version `version`;
        returns how many tensors."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        tensors = {name: t.detach().to("cpu", copy=True) for name, t in weights}
        self.loaded += 1
        folder = self.root / f"{self.loaded}-policy-v{version}"
        folder.mkdir()
        save_file(
            {peft_file_name(n): t.contiguous() for n, t in tensors.items()},
            folder / "adapter_model.safetensors",
        )
        self.config.save_pretrained(str(folder))
        previous = self.request
        self.request = LoRARequest(folder.name, self.loaded, str(folder))
        self.tensors = tensors
        if previous is not None:
            llm.llm_engine.remove_lora(previous.lora_int_id)
            if Path(previous.lora_path).parent == self.root:  # ours, not an exported folder
                shutil.rmtree(previous.lora_path, ignore_errors=True)
        return len(tensors)
