"""The embedded default dataset: procedurally drawn medical-looking MCQs whose pixels decide the answer.

Why it exists: the demo trains a ~0.6M-parameter random-init Qwen2.5-VL on a 2-core CPU, and it must
show GRPO raising held-out accuracy. Real medical MCQs are far beyond such a model, so this package
draws images a tiny model *can* read, and dresses them as medical questions in GMAI-Reasoning10K's
record format, so the whole pipeline (loader, prompts, rewards, rollout, learner) runs unchanged.

What a tiny VLM sees: a 56x56 image with patch 14 and spatial merge 2 reaches the language model as
4 visual tokens, one per 28x28 quadrant. So every cue here is coarse, high-contrast and spatial:
where the brightest blob is, how big it is, or which quadrants are black. Fine texture (speckle,
noise) is decoration that averages away inside a token.

Tasks (options in this fixed order unless `shuffle_options`; the modality of the lesion tasks is
random, named in the question, and independent of the answer):

| task            | question (one of 3 paraphrases)              | options                      | cue  |
|-----------------|----------------------------------------------|------------------------------|------|
| lesion_side     | In this {study}, on which side of the image  | Left / Right side of the     | bright blob in the left or right half |
|                 | is the lesion?                               | image                        |      |
| lesion_quadrant | ...which quadrant of the image contains the  | Upper left / Upper right /   | bright blob inside one quadrant = one token |
|                 | lesion?                                      | Lower left / Lower right     |      |
| modality        | What imaging modality was used to acquire    | X-ray / CT / MRI /           | layout: full frame with dark lungs and  |
|                 | this image?                                  | Ultrasound                   | spine; wide oval; tall oval; downward fan |
| lesion_size     | How large is the focal lesion in this        | Small nodule (under 1 cm) /  | blob radius ~3 px vs ~9 px at 56 px |
|                 | {study}?                                     | Large mass (over 3 cm)       |      |
| lesion_presence | Is there a focal lesion in this {study}?     | No focal lesion / Focal      | a bright blob or none |
|                 |                                              | lesion present               |      |

Guarantees (tested in tests/unit/test_synthetic.py):
- Balanced: in eval every option letter is the gold answer equally often per task (a constant-letter
  policy scores exactly 1/k); train is balanced to within one item per letter.
- Text carries no answer: question wording, study name and option order are drawn independently of
  the class, so a text-only model scores chance; a linear classifier on 14x14 pooled pixels scores
  far above it.
- Deterministic: the same arguments give byte-identical JSONL and PNG files; train and eval come
  from different random streams and share no image.

Cold-start SFT records (sft.jsonl, over the train images) come in five flavours:
- `sft_answers="true"` (default): `<think>` states the decisive cue, `<answer>` is the gold letter.
- `sft_answers="random"`: generic reasoning ("I examine the image and compare the options.") and a
  letter drawn independently of the truth, balanced over the options. It teaches the answer format
  and nothing about the task, so RL starts at chance and any gain is GRPO's.
- `describe` (the demo's), `name` and `check` (writer.sft_records): the finding, then a random
  letter; a random option's text and its letter; or the options checked in a fixed order up to a
  random "yes" (the cold start for shuffled options, conf/experiment/demo_shuffled.yaml). Each
  starts RL at chance.

Caveat: image paths name the modality (`images/2d/cls/<modality>/`, as in the real dataset), which
is the modality task's answer; never put the path or `MCQItem.modality` into a prompt.
"""

from gmai_rl.data.synthetic.cli import main
from gmai_rl.data.synthetic.generate import SyntheticItem, generate_items
from gmai_rl.data.synthetic.tasks import TASKS, TaskSpec
from gmai_rl.data.synthetic.writer import DEFAULT_TASKS, write_synthetic_dataset

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "SyntheticItem",
    "TaskSpec",
    "generate_items",
    "main",
    "write_synthetic_dataset",
]
