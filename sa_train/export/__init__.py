"""Export of sa_train checkpoints as Hugging Face model folders, and their evaluation with lm-eval.

- :mod:`sa_train.export.hf_names`: the one table from sa_train names to Hugging Face (Llama) names;
- :mod:`sa_train.export.writer`: checkpoint -> folder (config, safetensors, tokenizer, card);
- ``sa_train/export/remote/``: the configuration and modeling files an SA export ships as remote code;
- ``sa_train/export/tasks/``: the offline lm-eval tasks made from held-out text of the shipped corpus.

This package imports nothing heavy itself: the writer needs transformers, the name table does not.
"""
