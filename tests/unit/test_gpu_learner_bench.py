"""The GPU learner benchmark (benchmarks/gpu_learner.py) on CPU: its FLOP count by hand, its
fp32-master optimizer, a tiny run's record and table, and a run where Ray, DeepSpeed and vLLM
cannot be imported (a GPU machine with only torch and transformers)."""

import math
import os
import subprocess
import sys

import torch

from support import ROOT, load_script

SCRIPT = ROOT / "benchmarks" / "gpu_learner.py"
bench = load_script("benchmarks/gpu_learner.py", "gpu_learner_bench")


def test_text_flops_by_hand():
    d = bench.TextDims(
        layers=1, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10
    )
    # q [4 -> 4], k and v [4 -> 2] each, o [4 -> 4], gate/up/down 4 x 8 each.
    assert d.layer_matmul_params == 4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 8 == 144
    # 6 N T + 12 L H Q T^2 + 6 V hidden x scored, for T = 3 positions of which 2 are scored.
    assert bench.text_flops(d, seq_len=3, scored=2) == 6 * 144 * 3 + 12 * 2 * 2 * 9 + 6 * 10 * 4 * 2


def test_vision_flops_by_hand_with_a_short_last_window():
    d = bench.VisionDims(
        depth=2, hidden=2, intermediate=3, patch_dim=5, merge=2, out_hidden=4, window=2,
        full_blocks=1,
    )  # fmt: skip
    # 6 x 2 patches = 12 patches, 3 x 1 merged tokens: windows of 2 and 1 merged tokens.
    block = 4 * 2 * 2 + 3 * 2 * 3  # qkv + proj, SwiGLU MLP
    merger = (4 * 2) ** 2 + 4 * 2 * 4  # per merged token: [8 -> 8], [8 -> 4]
    dense = (5 * 2 + 2 * block) * 12 + merger * 3
    pairs = (8**2 + 4**2) + 12**2  # one windowed block (8 + 4 patches), one full block
    expected = 6 * dense + 12 * 2 * pairs
    assert bench.vision_flops(d, (1, 6, 2)) == expected
    assert bench.vision_flops(d, (1, 6, 2), trained=False) == expected / 3


def test_the_flop_dims_match_the_models_matmul_weights():
    config = bench.tiny_config()
    model = bench.build_model(config, torch.float32, torch.device("cpu"))
    text, vision = bench.TextDims.of(config.text_config), bench.VisionDims.of(config.vision_config)

    def weights(module):
        return sum(
            m.weight.numel()
            for m in module.modules()
            if hasattr(m, "weight") and m.weight.dim() > 1
        )

    assert weights(model.model.language_model.layers) == text.layers * text.layer_matmul_params
    blocks = model.model.visual.blocks
    assert weights(blocks) == vision.depth * (
        4 * vision.hidden**2 + 3 * vision.hidden * vision.intermediate
    )
    assert weights(model.model.visual.patch_embed) == vision.patch_dim * vision.hidden


def test_master_adamw_accumulates_bf16_gradients_in_fp32_and_copies_back():
    layer = torch.nn.Linear(3, 2, bias=False).to(torch.bfloat16)
    opt = bench.MasterAdamW(layer.parameters(), lr=0.1, grad_clip=0.0, fused=False)
    (master,) = opt.masters
    x = torch.ones(1, 3, dtype=torch.bfloat16)
    layer(x).sum().backward()
    layer(2 * x).sum().backward()
    assert layer.weight.grad is None  # moved into the master as backward made it
    assert master.grad.dtype == torch.float32
    torch.testing.assert_close(master.grad, torch.full((2, 3), 3.0))
    before = master.clone()
    norm = opt.step()
    assert math.isclose(float(norm), math.sqrt(6 * 9.0), rel_tol=1e-6)
    assert not torch.equal(master, before)
    assert torch.equal(layer.weight, master.to(torch.bfloat16))


def test_a_tiny_run_measures_positive_throughput_and_real_gradients():
    """In bf16, the GPU's precision: the gradients reach the fp32 masters through the hooks,
    under gradient checkpointing, over two micro-batches."""
    args = ["--tiny", "--steps", "2", "--warmup", "1", "--grad-accum", "2", "--dtype", "bf16"]
    record = bench.run(bench.parse_args(args))
    assert record.options.micro_batch == 2 and record.options.grad_checkpointing  # defaults
    assert len(record.step_seconds) == 2 and len(record.grad_norms) == 3
    assert math.isfinite(record.tokens_per_s) and record.tokens_per_s > 0
    assert all(math.isfinite(n) and n > 0 for n in record.grad_norms)
    assert all(math.isfinite(loss) for loss in record.losses)
    # 56 px: 4 x 4 patches, 4 image tokens between two delimiters, 16 prompt, 32 completion.
    assert record.tokens_per_step == 2 * 2 * (2 + 4 + 16 + 32)
    assert record.mfu is None and record.peak_memory_gb is None  # CPU: no peak to compare with
    rows = bench.table(record).splitlines()
    assert len(rows) == 3 and "tokens/s" in rows[0] and "| n/a |" in rows[2]


def test_the_script_runs_where_ray_deepspeed_and_vllm_cannot_be_imported():
    """A None entry in sys.modules makes `import ray` raise ImportError, as on a machine without
    it; the run must not need any of the three."""
    blocked = ("ray", "deepspeed", "vllm")
    code = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--tiny', '--steps', '1', '--warmup', '0']\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        f"assert all(sys.modules[m] is None for m in {blocked!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model (params) |" in done.stdout and "tiny Qwen2.5-VL" in done.stdout
