"""Project-wide primitives shared by retriever/, finetune/ and pipeline/: the error type users see, file helpers
and the registry of models that ship inside PyPI packages. It imports nothing from the other packages."""
