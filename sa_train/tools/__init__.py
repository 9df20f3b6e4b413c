"""Tool commands of ``python -m sa_train``: one small module, one plain function each."""
