"""Tiny benchmark files in every format `gmai_rl.benchmarks.loaders` reads, with real images.

Each `write_*` function writes one benchmark into a folder and returns a `Fixture`: the path to
give `load_benchmark`, how many questions load, and the bad rows it holds by reason (none with
`bad_rows=False`, for tests that load with on_error="raise"). Images are 8x8 PNGs/JPEGs drawn
with PIL, each of its own colour, so every image file is distinct.

    from benchmark_fixtures import write_vqa_rad
    fixture = write_vqa_rad(tmp_path)
    items, report = load_benchmark(fixture.benchmark, fixture.path, cache_dir=tmp_path / "c")
    assert len(items) == fixture.good and report.skipped == fixture.bad

Importable as `benchmark_fixtures` from any test (tests/ is on sys.path, see tests/support.py).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image


@dataclass(frozen=True)
class Fixture:
    benchmark: str
    """The name `load_benchmark` takes."""
    path: Path
    """What to point `load_benchmark` at."""
    good: int
    """Questions that load."""
    bad: dict[str, int] = field(default_factory=dict)
    """Reason -> bad rows of that reason (what `LoadReport.skipped` reads after on_error="skip")."""
    first_bad: str = ""
    """The reason of the first bad row (what on_error="raise" raises), "" when none."""
    left_out: int = 0
    """Rows the benchmark leaves out on purpose (mmmu-med: non-medical subjects)."""


# ---------------------------------------------------------------------------------------------
# Images

_colour = 0


def image_bytes(fmt: Literal["PNG", "JPEG"] = "PNG", size: tuple[int, int] = (8, 8)) -> bytes:
    """A small image of a colour no earlier call drew, encoded as `fmt`."""
    global _colour
    _colour += 1
    colour = ((_colour * 37) % 256, (_colour * 91) % 256, (_colour * 13 + 50) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def image_base64(fmt: Literal["PNG", "JPEG"] = "PNG") -> str:
    return base64.b64encode(image_bytes(fmt)).decode("ascii")


def write_image(path: Path, fmt: Literal["PNG", "JPEG"] = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(fmt))
    return path


BAD_BASE64 = "!!not-base64!!" * 6
"""Longer than 64 characters (so not an index reference) and not base64."""


def _write_tsv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, columns, delimiter="\t", restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _row(
    index: str, question: str, options: str, answer: str, image: str, **extra: str
) -> dict[str, str]:
    """A TSV row; `options` separated by "|" go to columns A, B, ... ("" for none)."""
    letters = dict(zip("ABCDE", options.split("|") if options else [], strict=False))
    return {
        "index": index,
        "question": question,
        **letters,
        "answer": answer,
        "image": image,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# VLMEvalKit TSVs


def write_vlmeval_mcq(
    folder: Path, *, bad_rows: bool = True, name: str = "vlmeval_mcq.tsv"
) -> Fixture:
    """A VLMEvalKit MCQ TSV: base64 PNG and JPEG rows, a row sharing an earlier row's image (its
    `image` is that row's index), one sharing a later row's, a two-image row (a stringified list),
    a hint; bad rows: an answer letter not among the options, undecodable base64."""
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
               "split", "image"]  # fmt: skip
    rows = [
        _row("1", "Which organ is shown?", "Liver|Spleen|Kidney|Heart", "A", image_base64(),
             hint="An abdominal CT."),
        _row("2", "Is the lesion benign?", "Yes|No", "B", "1"),
        _row("3", "Which image shows the lesion?", "First|Second|Neither", "C",
             str([image_base64(), image_base64("JPEG")])),
        _row("4", "What stain is used?", "H&E|PAS|Gram|None", "D", image_base64("JPEG"), hint=""),
        _row("5", "Same image, other question?", "Yes|No", "A", "6"),
        _row("6", "Which side?", "Left|Right", "B", image_base64()),
    ]  # fmt: skip
    bad = {}
    if bad_rows:
        rows.append(_row("7", "Which one?", "a|b|c|d", "E", image_base64()))
        rows.append(_row("8", "Broken image?", "a|b", "A", BAD_BASE64))
        bad = {"answer_not_in_options": 1, "unreadable_image": 1}
    common = {"category": "lesion", "l2-category": "diagnosis", "split": "dev"}
    path = _write_tsv(folder / name, columns, [{**common, **row} for row in rows])
    first_bad = "answer_not_in_options" if bad_rows else ""
    return Fixture("vlmeval-mcq", path, good=6, bad=bad, first_bad=first_bad)


def write_gmai_mmbench(
    folder: Path, *, split: Literal["VAL", "TEST"] = "VAL", bad_rows: bool = True
) -> Fixture:
    """GMAI-MMBench_<split>.tsv with its breakdown columns (modality, clinical VQA task,
    department, perceptual granularity). TEST has no answer column, as published; bad row (VAL):
    no image."""
    columns = ["index", "question", "A", "B", "C", "D", "E", "answer", "category", "l2-category",
               "image", "modality", "clinical VQA task", "department", "perceptual granularity"]  # fmt: skip

    def labels(modality: str, task: str, department: str, granularity: str) -> dict[str, str]:
        return {"modality": modality, "clinical VQA task": task, "department": department,
                "perceptual granularity": granularity}  # fmt: skip

    rows = [
        _row("101", "Which abnormality is in this CT?", "Nodule|Normal|Effusion", "A", image_base64(),
             **labels("CT", "Disease Diagnosis", "Pulmonary Medicine", "Image Level")),
        _row("102", "Which structure is outlined in this MR image?", "Liver|Brain|Kidney|Heart|Lung",
             "B", image_base64(),
             **labels("MR", "Organ Recognition", "Neurology", "Box Level")),
        _row("103", "Is there a fracture?", "Yes|No", "A", image_base64(),
             **labels("X-Ray", "Disease Diagnosis", "Orthopedics", "Image Level")),
    ]  # fmt: skip
    bad: dict[str, int] = {}
    if bad_rows and split == "VAL":
        rows.append(_row("104", "Where is the lesion?", "Left|Right", "A", "", modality="CT"))
        bad = {"missing_image": 1}
    for row in rows:
        row["category"], row["l2-category"] = (
            row.get("clinical VQA task", ""),
            row.get("department", ""),
        )
    if split == "TEST":  # published without answers
        columns.remove("answer")
        rows = [{k: v for k, v in row.items() if k != "answer"} for row in rows]
    path = _write_tsv(folder / f"GMAI-MMBench_{split}.tsv", columns, rows)
    good = 3 if split == "VAL" else 0
    return Fixture(
        "gmai-mmbench", path, good=good, bad=bad, first_bad="missing_image" if bad else ""
    )


def write_mmmu(folder: Path, *, bad_rows: bool = True) -> Fixture:
    """MMMU_DEV_VAL.tsv: medical rows (subject in `category`, spelt with spaces, or only in the id),
    `<image k>` placeholders in questions and options, a two-image row, an open question, a row of
    another subject (left out) whose image a medical row shares; bad row: <image 2> with one image."""
    columns = ["index", "id", "question", "A", "B", "C", "D", "answer", "category", "l2-category",
               "split", "image"]  # fmt: skip
    rows = [
        _row("1", "<image 1> What is the diagnosis?", "Pneumonia|Asthma|Normal", "A", image_base64(),
             id="validation_Clinical_Medicine_1", category="Clinical_Medicine"),
        _row("2", "Compare <image 1> and <image 2>.", "<image 1> is larger|<image 2> is larger", "B",
             str([image_base64(), image_base64()]),
             id="validation_Basic_Medical_Science_2", category="Basic Medical Science"),
        _row("3", "What dose is shown in <image 1>?", "", "42 mg", image_base64("JPEG"),
             id="validation_Pharmacy_3", category="Pharmacy"),
        _row("4", "Which style is <image 1>?", "Baroque|Cubism", "B", image_base64(),
             id="validation_Art_4", category="Art"),
        _row("5", "Which trend does <image 1> show?", "Rising|Falling", "A", image_base64(),
             id="validation_Public_Health_5", category=""),
        _row("7", "And what does <image 1> show now?", "A cat|A lung", "B", "4",
             id="validation_Clinical_Medicine_7", category="Clinical_Medicine"),
    ]  # fmt: skip
    bad = {}
    if bad_rows:
        rows.append(
            _row("6", "Compare <image 1> with <image 2>.", "Same|Different", "A", image_base64(),
                 id="validation_Diagnostics_and_Laboratory_Medicine_6",
                 category="Diagnostics_and_Laboratory_Medicine")
        )  # fmt: skip
        bad = {"conflicting_fields": 1}
    rows = [{"l2-category": "Health_and_Medicine", "split": "validation", **row} for row in rows]
    path = _write_tsv(folder / "MMMU_DEV_VAL.tsv", columns, rows)
    first_bad = "conflicting_fields" if bad else ""
    return Fixture("mmmu-med", path, good=5, bad=bad, first_bad=first_bad, left_out=1)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets: VQA-RAD, PathVQA

NOT_AN_IMAGE = b"not an image"


def _vqa_rows(kind: Literal["radiology", "pathology"], bad_rows: bool) -> list[dict[str, Any]]:
    """(question, answer, image file name, image bytes) rows; the first two share an image."""
    shared, other = image_bytes(), image_bytes("JPEG")
    questions = (
        [("Is there a pneumothorax?", "yes"), ("is the liver enlarged?", "No"),
         ("Which lung is affected?", "left lung")]
        if kind == "radiology"
        else [("Is this tissue necrotic?", "yes"), ("What is present?", "granuloma"),
              ("How is the nucleus stained?", "dark")]
    )  # fmt: skip
    images = [("img0.jpg", shared), ("img0.jpg", shared), ("img1.png", other)]
    if bad_rows:
        questions.append(("What is this?", "unknown"))
        images.append(("broken.png", NOT_AN_IMAGE))
    return [
        {"question": q, "answer": a, "image": {"path": name, "bytes": data}}
        for (q, a), (name, data) in zip(questions, images, strict=True)
    ]


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row[key] for row in rows] for key in ("image", "question", "answer")}


def _write_hf(
    folder: Path, rows: list[dict[str, Any]], layout: Literal["parquet", "save_to_disk"]
) -> Path:
    """As the hub repo (data/test-*.parquet) or `DatasetDict.save_to_disk`; both with a train
    split that the loader must not read."""
    train = [
        {
            "question": "Train only?",
            "answer": "yes",
            "image": {"path": "t.png", "bytes": image_bytes()},
        }
    ]
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        (folder / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(_columns(rows)), folder / "data" / "test-00000-of-00001.parquet")
        pq.write_table(pa.table(_columns(train)), folder / "data" / "train-00000-of-00001.parquet")
        return folder
    import datasets

    text = datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "question": text, "answer": text})
    splits = {
        name: datasets.Dataset.from_dict(_columns(split), features=features)
        for name, split in (("train", train), ("test", rows))
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def write_vqa_rad(
    folder: Path, *, layout: Literal["parquet", "save_to_disk"] = "parquet", bad_rows: bool = True
) -> Fixture:
    """VQA-RAD: yes/no (closed) and open answers, two questions on one image; bad row: image bytes
    that are not an image."""
    path = _write_hf(folder / "vqa-rad", _vqa_rows("radiology", bad_rows), layout)
    bad = {"unreadable_image": 1} if bad_rows else {}
    return Fixture("vqa-rad", path, good=3, bad=bad, first_bad="unreadable_image" if bad else "")


def write_path_vqa(
    folder: Path,
    *,
    layout: Literal["parquet", "save_to_disk", "tsv"] = "parquet",
    bad_rows: bool = True,
) -> Fixture:
    """PathVQA like `write_vqa_rad`, or as VLMEvalKit's short-answer TSV (layout="tsv": index,
    image, question, answer; no options)."""
    rows = _vqa_rows("pathology", bad_rows)
    bad = {"unreadable_image": 1} if bad_rows else {}
    if layout == "tsv":
        records = []
        for n, row in enumerate(rows):
            data = row["image"]["bytes"]
            image = BAD_BASE64 if data == NOT_AN_IMAGE else base64.b64encode(data).decode()
            records.append(
                {
                    "index": str(n),
                    "question": row["question"],
                    "answer": row["answer"],
                    "image": image,
                }
            )
        path = _write_tsv(
            folder / "PathVQA_TEST.tsv", ["index", "image", "question", "answer"], records
        )
    else:
        path = _write_hf(folder / "path-vqa", rows, layout)
    return Fixture("path-vqa", path, good=3, bad=bad, first_bad="unreadable_image" if bad else "")


# ---------------------------------------------------------------------------------------------
# Folders of JSON/CSV and image files


def write_slake(folder: Path, *, bad_rows: bool = True) -> Fixture:
    """SLAKE: test.json + imgs/xmlabN/source.jpg; English and Chinese, CLOSED (yes/no and
    other) and OPEN; bad rows: a missing image, an answer_type that is neither OPEN nor CLOSED."""
    root = folder / "SLAKE"
    for n in (1, 2):
        write_image(root / "imgs" / f"xmlab{n}" / "source.jpg", "JPEG")
    keys = (
        "qid",
        "img_name",
        "question",
        "answer",
        "answer_type",
        "q_lang",
        "modality",
        "content_type",
    )
    records = [
        (
            11,
            "xmlab1/source.jpg",
            "Is the lung healthy?",
            "No",
            "CLOSED",
            "en",
            "X-Ray",
            "Abnormality",
        ),
        (12, "xmlab1/source.jpg", "图中哪个器官不正常？", "肺", "OPEN", "zh", "X-Ray", "Organ"),
        (
            13,
            "xmlab2/source.jpg",
            "Which side is the lesion on?",
            "Left",
            "CLOSED",
            "en",
            "CT",
            "Position",
        ),
        (14, "xmlab2/source.jpg", "What modality is used?", "MRI", "OPEN", "en", "MRI", "Modality"),
    ]
    bad = {}
    if bad_rows:
        records.append(
            (15, "xmlab9/source.jpg", "Is it normal?", "Yes", "CLOSED", "en", "CT", "Abnormality")
        )
        records.append(
            (16, "xmlab1/source.jpg", "Is it normal?", "Yes", "MAYBE", "en", "CT", "Abnormality")
        )
        bad = {"missing_image": 1, "wrong_type": 1}
    document = [
        {**dict(zip(keys, record, strict=True)), "location": "Lung", "base_type": "vqa"}
        for record in records
    ]
    (root / "test.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return Fixture("slake", root, good=4, bad=bad, first_bad="missing_image" if bad else "")


def write_pmc_vqa(folder: Path, *, version: Literal[1, 2] = 2, bad_rows: bool = True) -> Fixture:
    """PMC-VQA: test_2.csv + figures/ (version 2: `Answer` is the letter) or test.csv + images/
    (version 1: `Answer` is the text, `Answer_label` the letter); choices written " A:text";
    bad rows: an answer letter not among the options, a figure in no image folder."""
    root = folder / "PMC-VQA"
    images = root / ("figures" if version == 2 else "images")
    questions = [
        ("What is the uptake pattern in the breast?", "Diffuse|Focal|No uptake|Cannot tell", "B"),
        ("Which imaging modality was used?", "CT|MRI|PET|Ultrasound", "D"),
        ("Where is the mass?", "Left lobe|Right lobe|Both|Neither", "A"),
    ]
    if bad_rows:
        questions += [("What is shown?", "a|b|c|d", "E"), ("Missing figure?", "x|y|z|w", "A")]
    rows = []
    for n, (question, options, answer) in enumerate(questions):
        figure = f"PMC{1000 + n}_F1.jpg"
        if question != "Missing figure?":
            write_image(images / figure, "JPEG")
        choices = dict(zip("ABCD", options.split("|"), strict=True))
        row = {"index": str(n), "Figure_path": figure, "Caption": "A figure.", "Question": question,
               **{f"Choice {k}": f" {k}:{v}" for k, v in choices.items()}, "split": "test"}  # fmt: skip
        if version == 2:
            row["Answer"] = answer
        else:
            row.update({"Answer": choices.get(answer, "Other"), "Answer_label": answer})
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    with (root / ("test_2.csv" if version == 2 else "test.csv")).open("w", newline="") as file:
        writer = csv.DictWriter(file, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    bad = {"answer_not_in_options": 1, "missing_image": 1} if bad_rows else {}
    first_bad = "answer_not_in_options" if bad else ""
    return Fixture("pmc-vqa", root, good=3, bad=bad, first_bad=first_bad)


def _omni(
    qid: str, dataset: str, image: str, question: str, options: str, gt: str, **extra: str
) -> dict[str, str]:
    letters = {f"option_{k}": v for k, v in zip("ABCD", options.split("|"), strict=False)}
    return {"dataset": dataset, "question_id": qid, "question_type": "Disease Diagnosis",
            "question": question, "gt_answer": gt, "image_path": image, **letters, **extra}  # fmt: skip


def write_omnimedvqa(folder: Path, *, bad_rows: bool = True) -> Fixture:
    """OmniMedVQA: QA_information/Open-access/*.json and Restricted-access/*.json, images under
    Images/; `gt_answer` is an option's text; one file says `modality` instead of
    `modality_type`; a question with three options; bad rows: a gt_answer matching no option, a
    missing image."""
    root = folder / "OmniMedVQA"
    for image in ("ACRIMA/Im001.png", "Chest CT/ct_01.png", "Hospital/h1.png"):
        write_image(root / "Images" / image)
    ct = {"modality": "CT(Computed Tomography)"}
    files = {
        "Open-access/ACRIMA.json": [
            _omni("ACRIMA_0001", "ACRIMA", "Images/ACRIMA/Im001.png", "Is there glaucoma?", "Yes|No",
                  "No", modality_type="Fundus Photography"),
        ],
        "Open-access/Chest CT.json": [
            _omni("CT_0001", "Chest CT", "Images/Chest CT/ct_01.png", "Which organ is shown?",
                  "Heart|Lung|Liver", "Lung", **ct),
        ],
        "Restricted-access/Hospital.json": [
            _omni("H_0001", "Hospital", "Images/Hospital/h1.png", "What modality is this?",
                  "CT|MRI|X-Ray|PET", "MRI", modality_type="MR (Mag-netic Resonance Imaging)"),
        ],
    }  # fmt: skip
    bad = {}
    if bad_rows:
        files["Open-access/Chest CT.json"] += [
            _omni("CT_0002", "Chest CT", "Images/Chest CT/ct_01.png", "Which side?", "Left|Right",
                  "Middle", **ct),
            _omni("CT_0003", "Chest CT", "Images/Chest CT/missing.png", "Which organ?", "Heart|Lung",
                  "Lung", **ct),
        ]  # fmt: skip
        bad = {"answer_not_in_options": 1, "missing_image": 1}
    for name, records in files.items():
        (root / "QA_information" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "QA_information" / name).write_text(json.dumps(records), encoding="utf-8")
    first_bad = "answer_not_in_options" if bad else ""
    return Fixture("omnimedvqa", root, good=3, bad=bad, first_bad=first_bad)


def write_medxpertqa(folder: Path, *, bad_rows: bool = True) -> Fixture:
    """MedXpertQA MM as the hub repo: MM/test.jsonl and images/ at the top; questions ending in
    "Answer Choices: (A) ..."; a two-image question; bad rows: a label not among the options,
    a line that is not JSON."""
    root = folder / "MedXpertQA"
    for name in ("MM-1-a.jpeg", "MM-2-a.jpeg", "MM-2-b.png"):
        write_image(root / "images" / name, "JPEG" if name.endswith("jpeg") else "PNG")
    options = {"A": "Erythema infectiosum", "B": "Cutis marmorata", "C": "Cold agglutinin disease",
               "D": "Livedo reticularis", "E": "Erythema ab igne"}  # fmt: skip
    choices = "Answer Choices: " + " ".join(f"({k}) {v}" for k, v in options.items())
    records = [
        {"id": "MM-1", "question": f"A 70-year-old woman has a rash. What is the diagnosis?\n{choices}",
         "options": options, "label": "C", "images": ["MM-1-a.jpeg"], "medical_task": "Diagnosis",
         "body_system": "Integumentary", "question_type": "Reasoning"},
        {"id": "MM-2", "question": f"Which finding do the two images share? {choices}",
         "options": options, "label": "A", "images": ["MM-2-a.jpeg", "MM-2-b.png"],
         "medical_task": "Basic Medicine", "body_system": "Cardiovascular",
         "question_type": "Understanding"},
    ]  # fmt: skip
    lines = [json.dumps(record) for record in records]
    bad = {}
    if bad_rows:
        lines.append(json.dumps({**records[0], "id": "MM-3", "label": "F"}))
        lines.append('{"id": "MM-4", "question": ')
        bad = {"answer_not_in_options": 1, "invalid_json": 1}
    (root / "MM").mkdir(parents=True, exist_ok=True)
    (root / "MM" / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    first_bad = "answer_not_in_options" if bad else ""
    return Fixture("medxpertqa-mm", root, good=2, bad=bad, first_bad=first_bad)


def write_gmai_reasoning10k(folder: Path) -> Path:
    """A GMAI-Reasoning10K-shaped JSONL (reasoning_mcq_rl.jsonl) as published: `image` relative to
    the dataset folder, whose path names the modality, and a human/gpt conversation whose gpt turn
    is the bare letter. For the training loader (`gmai_rl.data.loader`), not `load_benchmark`."""
    root = folder / "GMAI-Reasoning10K"
    write_image(root / "2d" / "cls" / "mri" / "brain_001.png")
    write_image(root / "2d" / "cls" / "ultrasound" / "thyroid_002.png")
    questions = [
        (
            "2d/cls/mri/brain_001.png",
            "Which abnormality is visible?\nA. Glioma\nB. Meningioma\nC. No tumour",
            "B",
        ),
        (
            "2d/cls/ultrasound/thyroid_002.png",
            "Is the nodule benign or malignant?\nA. Benign\nB. Malignant",
            "A",
        ),
    ]
    records = [
        {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                           {"from": "gpt", "value": answer}]}
        for image, question, answer in questions
    ]  # fmt: skip
    path = root / "reasoning_mcq_rl.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


WRITERS = {
    "gmai-mmbench": write_gmai_mmbench,
    "omnimedvqa": write_omnimedvqa,
    "vqa-rad": write_vqa_rad,
    "slake": write_slake,
    "path-vqa": write_path_vqa,
    "pmc-vqa": write_pmc_vqa,
    "mmmu-med": write_mmmu,
    "medxpertqa-mm": write_medxpertqa,
    "vlmeval-mcq": write_vlmeval_mcq,
}
"""Benchmark name -> the writer of its default fixture (called as `writer(folder, bad_rows=...)`)."""
