"""Downstream fine-tuning and GLUE evaluation: how a student is judged after distillation.

  tasks.py    GLUE (tfds), local CSV / TSV / JSONL files, the built-in pydocs-topics task
  data.py     tokenizing a task's examples, resumable batches
  metrics.py  GLUE's metrics (scikit-learn / scipy), task score, macro-score
  step.py     the classifier's objective on the step template, and its scoring step
  evaluation.py  predictions, the task's metrics, the loop's evaluator
  config.py   FinetuneConfig (run_glue's recipe by default)
  run.py      ``finetune(cfg)``: the wiring of the loop, evaluation, best checkpoint, exact resume
  glue.py     every task for a model (and a teacher to compare), the paper's table
  predict.py  labels and scores of a fine-tuned model for texts
"""
