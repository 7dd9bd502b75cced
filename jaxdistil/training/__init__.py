"""What every training run shares, knowing nothing of distillation or fine-tuning.

  state.py       TrainState (params, optimizer state, step, RNG, the objective's extra modules), born sharded
  sharding.py    the device mesh and the one logical-axis rules table
  optim.py       the AdamW chain, schedules, frozen parameters
  step.py        the step template: an Objective -> a donated, jitted update (+ the scoring steps)
  loop.py        run(step, state, batches, hooks): the one training loop
  hooks.py       Log, Evaluate(evaluator, every), Checkpoint(every, keep best)
  checkpoint.py  orbax checkpoints of a TrainState and the data iterator's state
  metrics.py     metrics.jsonl / TensorBoard / progress, sums divided once, tokens/s, MFU
  stopping.py    SIGTERM / Ctrl-C: save, then stop
  rundir.py      the run directory's lock
"""
