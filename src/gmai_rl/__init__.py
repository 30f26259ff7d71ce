"""gmai-rl: GRPO for vision-language models reasoning about medical images (GMAI-VL-R1).

Importing the package is cheap: subpackages load their own dependencies, and the pure ones
(`gmai_rl.data`, `gmai_rl.reward`, `gmai_rl.algo`) never import Ray, vLLM or DeepSpeed.
"""

__version__ = "0.1.0"
