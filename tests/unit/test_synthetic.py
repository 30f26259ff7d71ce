"""The synthetic dataset must be learnable from the pixels and only from the pixels.

The demo's claim ("GRPO raised held-out accuracy by >= 20 points") is only meaningful if (a) the
answer is in the image, (b) the text gives nothing away, and (c) the held-out split is balanced, so a
policy that always says "A" scores exactly chance. These tests check each with a deliberately simple
baseline; they also pin the record format, determinism, and the two SFT flavours.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from gmai_rl.data.synthetic import TASKS, generate_items, main, write_synthetic_dataset
from gmai_rl.data.synthetic.generate import GENERIC_REASONING
from gmai_rl.data.synthetic.writer import SftAnswers

ALL_TASKS = tuple(TASKS)
SEED = 7


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def task_of(record: dict) -> str:
    # ids look like synth_<split>_<task>_<index>
    return record["id"].split("_", 2)[2].rsplit("_", 1)[0]


def gold_of(record: dict) -> str:
    return record["conversations"][1]["value"]


def sft_letter(record: dict) -> str:
    return re.fullmatch(r"<think>.+</think>\n<answer>([A-Z])</answer>", gold_of(record), re.S)[1]


def hash_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # 10 items per task: not a multiple of 4 on purpose, so eval must round the 4-option tasks to 8.
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(
        out, n_train=50, n_eval=50, seed=SEED, sft_answers="true", n_sft=None
    )


# --- format ---------------------------------------------------------------------------------------


def test_records_have_the_gmai_reasoning10k_shape(dataset: dict[str, Path]) -> None:
    root = dataset["train"].parent
    for split in ("train", "eval", "sft"):
        for record in read_jsonl(dataset[split]):
            assert set(record) == {"id", "image", "conversations"}
            image = Path(record["image"])
            assert not image.is_absolute()
            assert image.parts[:3] == ("images", "2d", "cls")
            assert image.parts[3] in {"x_ray", "ct", "mri", "ultrasound"}
            assert (root / image).is_file()
            human, gpt = record["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            lines = human["value"].split("\n")
            assert lines[0] == "<image>"
            letters = [line[0] for line in lines[2:]]
            assert letters == list("ABCD"[: len(TASKS[task_of(record)].classes)])
            assert all(re.fullmatch(r"[A-D]\. \S.*", line) for line in lines[2:])
            answer = sft_letter(record) if split == "sft" else gpt["value"]
            assert answer in letters


def test_images_are_rgb_pngs_of_the_requested_size(tmp_path: Path) -> None:
    from PIL import Image

    paths = write_synthetic_dataset(tmp_path, n_train=4, n_eval=4, seed=0, image_size=112)
    for record in read_jsonl(paths["train"]):
        with Image.open(tmp_path / record["image"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (112, 112)


def test_on_image_reports_each_image_written_of_the_total(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    write_synthetic_dataset(
        tmp_path, n_train=4, n_eval=4, seed=0, on_image=lambda *args: calls.append(args)
    )
    images = list((tmp_path / "images").rglob("*.png"))
    assert calls == [(i, len(images)) for i in range(1, len(images) + 1)]


def test_loader_reads_the_written_files(dataset: dict[str, Path]) -> None:
    loader = pytest.importorskip("gmai_rl.data.loader")
    for split in ("train", "eval", "sft"):
        records = read_jsonl(dataset[split])
        items = loader.load_mcq_jsonl(dataset[split], image_root=dataset[split].parent)
        assert [item.id for item in items] == [record["id"] for record in records]
        for item, record in zip(items, records, strict=True):
            assert item.answer == (sft_letter(record) if split == "sft" else gold_of(record))
            assert list(item.options) == list("ABCD"[: len(TASKS[task_of(record)].classes)])
            assert item.modality == Path(record["image"]).parts[3]
            assert (item.reasoning is not None) == (split == "sft")


# --- balance and independence ---------------------------------------------------------------------


def test_eval_split_gives_every_letter_equally_often_per_task(dataset: dict[str, Path]) -> None:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for record in read_jsonl(dataset["eval"]):
        counts[task_of(record)][gold_of(record)] += 1
    assert set(counts) == set(ALL_TASKS)
    for task, by_letter in counts.items():
        k = len(TASKS[task].classes)
        assert sorted(by_letter) == list("ABCD"[:k])
        assert len(set(by_letter.values())) == 1, (task, by_letter)


def test_train_split_is_balanced_to_within_one(dataset: dict[str, Path]) -> None:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for record in read_jsonl(dataset["train"]):
        counts[task_of(record)][gold_of(record)] += 1
    for by_letter in counts.values():
        assert max(by_letter.values()) - min(by_letter.values()) <= 1


def test_train_and_eval_share_no_image() -> None:
    def pixel_hashes(split: str) -> set[str]:
        return {
            hashlib.sha256(item.pixels.tobytes()).hexdigest()
            for task in ALL_TASKS
            for item in generate_items(task, 20, SEED, split=split)
        }

    train, held_out = pixel_hashes("train"), pixel_hashes("eval")
    assert len(train) == len(held_out) == 20 * len(ALL_TASKS)
    assert not train & held_out


def test_fixed_options_keep_the_task_order() -> None:
    for task, spec in TASKS.items():
        for item in generate_items(task, 8, SEED):
            assert list(item.options.values()) == list(spec.classes)
            assert item.options[item.answer] == spec.classes["ABCD".index(item.answer)]


def test_shuffled_options_change_only_the_option_order() -> None:
    fixed = generate_items("lesion_quadrant", 40, SEED)
    shuffled = generate_items("lesion_quadrant", 40, SEED, shuffle_options=True)
    orders = {tuple(item.options.values()) for item in shuffled}
    assert len(orders) > 10  # many of the 24 permutations occur
    for a, b in zip(fixed, shuffled, strict=True):
        assert np.array_equal(a.pixels, b.pixels) and a.question == b.question
        assert a.options[a.answer] == b.options[b.answer]  # same class, maybe another letter
    assert Counter(item.answer for item in shuffled) == {"A": 10, "B": 10, "C": 10, "D": 10}


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    def write(folder: str, seed: int) -> dict[str, str]:
        args = {"n_train": 20, "n_eval": 20, "shuffle_options": True, "sft_answers": "random"}
        write_synthetic_dataset(tmp_path / folder, seed=seed, **args)
        return hash_tree(tmp_path / folder)

    first, again, other_seed = write("a", 3), write("b", 3), write("c", 4)
    assert first == again
    assert len(first) == 20 + 20 + 4  # images + 3 JSONL files + manifest
    assert set(first.values()).isdisjoint(other_seed.values())


# --- SFT cold start -------------------------------------------------------------------------------


def test_truthful_sft_states_the_cue_and_the_gold_letter(dataset: dict[str, Path]) -> None:
    train = {record["id"]: record for record in read_jsonl(dataset["train"])}
    sft = read_jsonl(dataset["sft"])
    assert [record["id"] for record in sft] == list(train)
    for record in sft:
        rl = train[record["id"]]
        assert record["image"] == rl["image"]
        assert sft_letter(record) == gold_of(rl)
        option_text = dict(
            line.split(". ", 1) for line in rl["conversations"][0]["value"].split("\n")[2:]
        )
        assert f"option {gold_of(rl)}: {option_text[gold_of(rl)]}" in gold_of(record)


def test_random_sft_teaches_the_format_but_not_the_answer(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(
        tmp_path,
        n_train=400,
        n_eval=0,
        seed=SEED,
        tasks=["lesion_side", "lesion_quadrant"],
        sft_answers="random",
    )
    gold = {record["id"]: gold_of(record) for record in read_jsonl(paths["train"])}
    letters: dict[str, Counter[str]] = defaultdict(Counter)
    agree: Counter[str] = Counter()
    for record in read_jsonl(paths["sft"]):
        reasoning = re.match(r"<think>(.+)</think>", gold_of(record))[1]
        assert reasoning in GENERIC_REASONING  # says nothing about the image
        letters[task_of(record)][sft_letter(record)] += 1
        agree[task_of(record)] += sft_letter(record) == gold[record["id"]]
    assert letters["lesion_side"] == {"A": 100, "B": 100}
    assert letters["lesion_quadrant"] == {"A": 50, "B": 50, "C": 50, "D": 50}
    # Agreement with the truth is what independent letters give: 1/k, within sampling noise.
    assert abs(agree["lesion_side"] / 200 - 1 / 2) < 0.1
    assert abs(agree["lesion_quadrant"] / 200 - 1 / 4) < 0.1


def test_describe_sft_states_the_finding_but_a_random_letter(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(
        tmp_path, n_train=200, n_eval=0, seed=SEED, tasks=["modality"], sft_answers="describe"
    )
    train = {record["id"]: record for record in read_jsonl(paths["train"])}
    items = {item.id: item for item in generate_items("modality", 200, SEED, split="train")}
    letters: Counter[str] = Counter()
    agree = 0
    for record in read_jsonl(paths["sft"]):
        reasoning = re.match(r"<think>(.+)</think>", gold_of(record))[1]
        assert reasoning == items[record["id"]].finding  # describes this image ...
        assert not re.search(r"\boption\b|\b[A-D]\b", reasoning)  # ... naming no option
        letters[sft_letter(record)] += 1
        agree += sft_letter(record) == gold_of(train[record["id"]])
    assert letters == {"A": 50, "B": 50, "C": 50, "D": 50}
    assert abs(agree / 200 - 1 / 4) < 0.1


def shuffled_sft(
    tmp_path: Path, task: str, answers: SftAnswers
) -> tuple[dict[str, str], list[dict]]:
    """200 train questions of `task` with shuffled options: their gold letters by id, and the SFT
    records of the `answers` flavour."""
    paths = write_synthetic_dataset(
        tmp_path,
        n_train=200,
        n_eval=0,
        seed=SEED,
        tasks=[task],
        shuffle_options=True,
        sft_answers=answers,
    )
    gold = {record["id"]: gold_of(record) for record in read_jsonl(paths["train"])}
    return gold, read_jsonl(paths["sft"])


def test_name_sft_names_a_random_option_and_answers_its_letter(tmp_path: Path) -> None:
    gold, sft = shuffled_sft(tmp_path, "modality", "name")
    letters: Counter[str] = Counter()
    agree = 0
    for record in sft:
        prompt = record["conversations"][0]["value"]
        named = re.fullmatch(
            r"<think>(.+) This is (.+), option ([A-D])\.</think>\n<answer>([A-D])</answer>",
            gold_of(record),
        )
        assert named is not None, gold_of(record)
        text, letter, answer = named[2], named[3], named[4]
        assert f"\n{letter}. {text}" in prompt  # the prompt gives that text that letter ...
        assert answer == letter  # ... and the answer is it
        letters[letter] += 1
        agree += letter == gold[record["id"]]
    assert letters == {"A": 50, "B": 50, "C": 50, "D": 50}
    assert abs(agree / 200 - 1 / 4) < 0.1  # which option: unrelated to the image


@pytest.mark.parametrize("task", ["modality", "lesion_side"])
def test_check_sft_checks_options_in_class_order_until_a_random_yes(
    tmp_path: Path, task: str
) -> None:
    gold, sft = shuffled_sft(tmp_path, task, "check")
    classes = TASKS[task].classes
    letters: Counter[str] = Counter()
    agree = 0
    for record in sft:
        prompt = record["conversations"][0]["value"]
        target = re.fullmatch(
            r"<think>(.+?\.) ((?:.+? is [A-D]: no\. )*.+? is [A-D]: yes\.)</think>"
            r"\n<answer>([A-D])</answer>",
            gold_of(record),
        )
        assert target is not None, gold_of(record)
        checks = re.findall(r"(.+?) is ([A-D]): (yes|no)\.(?: |$)", target[2])
        texts = [text for text, _, _ in checks]
        assert texts == list(classes[: len(checks)])  # the fixed order, stopping at the "yes"
        for text, letter, _ in checks:
            assert f"\n{letter}. {text}" in prompt  # each text with the letter the prompt gives it
        assert [verdict for _, _, verdict in checks] == ["no"] * (len(checks) - 1) + ["yes"]
        answer = target[3]
        assert answer == checks[-1][1]  # the answer is the letter of the "yes"
        letters[answer] += 1
        agree += answer == gold[record["id"]]
    k = len(classes)
    assert letters == {letter: 200 // k for letter in "ABCD"[:k]}
    assert abs(agree / 200 - 1 / k) < 0.1  # where the "yes" falls: unrelated to the image


def test_sft_answers_must_be_a_known_flavour(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sft_answers"):
        write_synthetic_dataset(tmp_path, n_train=5, n_eval=0, sft_answers="maybe")  # type: ignore[arg-type]


# --- learnable from pixels, not from text ---------------------------------------------------------


def pooled_gray(items: list, pool: int = 4) -> np.ndarray:
    """(n, (size/pool)^2) features: 4x4 average-pooled gray levels in [0, 1]."""
    gray = np.stack([item.pixels[:, :, 0] for item in items]).astype(np.float32) / 255.0
    n, size, _ = gray.shape
    return gray.reshape(n, size // pool, pool, size // pool, pool).mean(axis=(2, 4)).reshape(n, -1)


def ridge_classifier(x_train: np.ndarray, y_train: np.ndarray, k: int, alpha: float = 10.0):
    """One-vs-rest least squares on standardised features: the simplest pixel model worth the name."""
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-3

    def design(x: np.ndarray) -> np.ndarray:
        return np.c_[(x - mean) / scale, np.ones(len(x))]

    a = design(x_train)
    weights = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ np.eye(k)[y_train])
    return lambda x: (design(x) @ weights).argmax(1)


def letter_indices(items: list) -> np.ndarray:
    return np.array(["ABCD".index(item.answer) for item in items])


@pytest.mark.parametrize("task", ALL_TASKS)
def test_a_linear_pixel_classifier_beats_chance_by_far(task: str) -> None:
    k = len(TASKS[task].classes)
    train = generate_items(task, 300, SEED, split="train")
    held_out = generate_items(task, 200, SEED, split="eval")
    predict = ridge_classifier(pooled_gray(train), letter_indices(train), k)
    accuracy = float((predict(pooled_gray(held_out)) == letter_indices(held_out)).mean())
    # Measured at this seed: 1.0 for side, quadrant and modality, ~0.99 size, ~0.85 presence (a
    # bright spot anywhere is not a linear function of pixels; attention handles it better).
    assert accuracy >= 1 / k + 0.25, accuracy


def words(items: list) -> set[str]:
    return {word for item in items for word in item.prompt.split()}


def bag_of_words(items: list, vocabulary: dict[str, int]) -> np.ndarray:
    """Counts weighted by position, so the features see the option order as well as the words."""
    counts = np.zeros((len(items), len(vocabulary)), dtype=np.float32)
    for row, item in enumerate(items):
        for position, word in enumerate(item.prompt.split()):
            if word in vocabulary:
                counts[row, vocabulary[word]] += 1.0 + position / 100
    return counts


@pytest.mark.parametrize("shuffle_options", [False, True], ids=["fixed", "shuffled"])
def test_a_text_only_model_scores_chance(shuffle_options: bool) -> None:
    """Memorise the majority train answer per exact prompt (falling back to the overall majority),
    and a bag-of-words linear model of the prompt: both stay at chance on the held-out split."""
    for task, spec in TASKS.items():
        k = len(spec.classes)
        # Text is drawn from its own random stream: a tiny image size gives the same prompts, faster.
        make = {"image_size": 8, "shuffle_options": shuffle_options}
        train = generate_items(task, 200, SEED, split="train", **make)
        held_out = generate_items(task, 800, SEED, split="eval", **make)

        by_prompt: dict[str, Counter[str]] = defaultdict(Counter)
        for item in train:
            by_prompt[item.prompt][item.answer] += 1
        overall = Counter(item.answer for item in train).most_common(1)[0][0]
        memorised = [
            by_prompt[item.prompt].most_common(1)[0][0] if item.prompt in by_prompt else overall
            for item in held_out
        ]
        memorised_accuracy = np.mean(
            [p == item.answer for p, item in zip(memorised, held_out, strict=True)]
        )

        vocabulary = {word: i for i, word in enumerate(sorted(words(train)))}
        x_train, x_held_out = bag_of_words(train, vocabulary), bag_of_words(held_out, vocabulary)
        predict = ridge_classifier(x_train, letter_indices(train), k)
        bow_accuracy = float((predict(x_held_out) == letter_indices(held_out)).mean())

        for accuracy in (memorised_accuracy, bow_accuracy):
            # 800 held-out items: one standard error is 1.5-1.8 points; the worst of these 20
            # numbers over seeds 5-8 was 5.5 points off chance, in either direction.
            assert abs(accuracy - 1 / k) <= 0.08, (task, memorised_accuracy, bow_accuracy)


# --- command line ---------------------------------------------------------------------------------


def test_main_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--n-train", "8", "--n-eval", "8", "--seed", "1"]
    argv += ["--tasks", "lesion_side,modality", "--shuffle-options", "--sft-answers", "random"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["eval"] == {"lesion_side": 4, "modality": 4}
    assert manifest["shuffle_options"] is True and manifest["sft_answers"] == "random"
    assert len(read_jsonl(tmp_path / "sft.jsonl")) == 8
    assert "train.jsonl" in capsys.readouterr().out
