"""Export of sa_train checkpoints as Hugging Face model folders, and their evaluation with lm-eval; the
reading of a Llama folder for ``convert --hf``.

- :mod:`sa_train.export.hf_names`: the one table between sa_train and Hugging Face (Llama) names, both ways;
- :mod:`sa_train.export.writer`: checkpoint -> folder (config, safetensors, tokenizer, card);
- :mod:`sa_train.export.reader`: Llama folder -> dense model checkpoint data (the input of ``convert --hf``);
- ``sa_train/export/remote/``: the configuration and modeling files an SA export ships as remote code;
- ``sa_train/export/tasks/``: the offline lm-eval tasks made from held-out text of the shipped corpus.

This package imports nothing heavy itself: the writer needs transformers, the name table and the reader do
not.
"""
