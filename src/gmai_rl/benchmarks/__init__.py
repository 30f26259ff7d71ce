"""Medical VQA benchmarks in their published formats: loaders (local files only), one
rule-based scorer, and results broken down by modality and category (docs/evaluation.md)."""
