"""The distillation objective (and MLM-only / causal-LM training) on the training core.

  config.py      RunConfig: teacher, student, data, loader, masking, loss, optim, mesh, ...
  losses.py      the triple loss as sums and denominators (the logits engine: row gathering,
                 chunks, custom gradient, per-data-shard head reduction)
  terms.py       distillation loss terms by name (soft targets, hard targets, hidden states,
                 attention and MiniLM relations) as sums and denominators; not wired into the
                 step's config yet
  objective.py   DistillObjective: masking, teacher and student forward passes, the losses
  builder.py     DistillStep: the one place a distillation step is built
  evaluation.py  held-out masked-LM scores (the loop's evaluator; ``jaxdistil evaluate``)
  run_files.py   a distillation run directory's own files and checks
"""
