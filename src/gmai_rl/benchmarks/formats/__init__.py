"""One reader per published benchmark format; `gmai_rl.benchmarks.loaders` is the public entry.

Each reader turns what the user pointed at into `Row`s (`common.py`): a `BenchItem`, or the
`RecordError` that says why the row cannot be one, with where it is. The loader checks the images,
the ids and the limit, and applies `on_error`.

    vlmeval_tsv.py  VLMEvalKit TSVs: GMAI-MMBench, MMMU (medical subjects), any MCQ TSV, base64 images
    hf_vqa.py       VQA-RAD, PathVQA as Hugging Face datasets (save_to_disk folders, parquet files)
    slake.py        SLAKE's test.json + imgs/
    pmc_vqa.py      PMC-VQA's CSVs + the image folder beside them
    omnimedvqa.py   OmniMedVQA's QA_information/*/*.json
    medxpertqa.py   MedXpertQA MM's JSONL + images/
"""
