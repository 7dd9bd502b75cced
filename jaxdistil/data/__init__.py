"""Data: corpus -> tokenizer -> ArrayRecord shards (``prepare``), the grain loader, MLM masking.

  corpus.py        sources: local files/globs, tfds:NAME, builtin:python-docs
  builders.py      tfds builders that write local text and the built-in corpus as ArrayRecord
  tokenization.py  load a Hugging Face fast tokenizer or train a WordPiece one; tokenizer hash
  prepare.py       PrepareConfig + prepare: parallel tokenization into shards, the manifest
  manifest.py      reading the manifest; ``check_vocab`` for a teacher; token counts and weights
  loader.py        LoaderConfig and the grain loader (length-grouped or packed, resumable)
  global_batches.py  each process's rows of the global batches of a multi-process run
  masking.py       MaskingConfig and the on-device dynamic MLM masking

Submodules are imported on use: importing this package stays cheap.
"""
