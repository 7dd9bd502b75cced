"""The shard study: one distillation step, many meshes, measured side by side (``jaxdistil shard-study``).

  hlo.py       collectives (with their replica groups), matmul FLOPs and per-op costs of an optimized HLO module
  memory.py    per-device bytes of placed (or abstract) arrays, the compiler's memory analysis
  cost.py      StepCost: what one step costs each device (FLOPs, bytes, collectives by kind and mesh axis)
  hardware.py  the accelerator table (H100, H200, A100, TPU v4 / v5p / v5e / v6e, calibrated cpu), target names
  predict.py   roofline-v1: step time, tokens/s, MFU, memory fit and bound of a StepCost on a target
  report.py    StrategyResult rows and the table / CSV / JSON / Markdown / PNG outputs
  study.py     StudySetup, measure_strategy, run_study
"""
