"""The ``jaxdistil`` commands: each module parses its arguments and calls the library.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Nothing in the
library imports this package; ``jaxdistil.cli`` imports a command's module only when it runs, so
``jaxdistil --help`` stays fast.
"""

from __future__ import annotations

# command -> (module under jaxdistil.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "selfcheck": ("selfcheck", "check the Flax models against transformers' PyTorch models"),
    "prepare": ("prepare", "tokenize a corpus into ArrayRecord shards"),
    "train": ("train", "train (distil or MLM-pretrain) from a YAML config"),
    "cache-teacher": ("cache_teacher", "store a run's teacher outputs once, for students to train from (teacher.cache)"),
    "init-student": ("init_student", "initialise a student from teacher layers (DistilBERT, RoBERTa, GPT-2)"),
    "evaluate": ("evaluate", "held-out MLM loss, perplexity and accuracy of a model"),
    "export": ("export", "export a run to a Hugging Face model directory"),
    "import": ("import_model", "import a Hugging Face model into a Flax model directory"),
    "fill-mask": ("fill_mask", "top-k predictions for [MASK] tokens"),
    "generate": ("generate", "continue a prompt with a causal LM (GPT-2)"),
    "finetune": ("finetune", "fine-tune an encoder on a classification / regression task (GLUE, files)"),
    "glue": ("glue", "fine-tune and score a model on every GLUE task; compare with a teacher"),
    "predict": ("predict", "label and score of a text with a fine-tuned classifier"),
    "demo": ("demo", "the built-in end-to-end demo: tokenizer, teacher, student, report"),
    "launch": ("launch", "start N local processes for a multi-process run"),
    "shard-study": ("shard_study", "compare mesh strategies for the distillation step"),
}
