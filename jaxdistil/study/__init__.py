"""The shard study: one distillation step, many meshes, measured side by side (``jaxdistil shard-study``).

  hlo.py      collectives and matmul FLOPs of an optimized HLO module
  memory.py   per-device bytes of placed arrays, the compiler's memory analysis
  report.py   StrategyResult rows and the table / CSV / JSON / Markdown / PNG outputs
  study.py    StudySetup, measure_strategy, run_study
"""
