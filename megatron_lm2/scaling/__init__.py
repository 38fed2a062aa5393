"""Scaling studies: `lm2-sweep` (docs/scaling.md).

    sweepfile  the typed sweep.toml          ladder   one knob -> a model, both families
    rules      batch size and LR per run     layout   a parallel layout per run (dry-run planner)
    plan       the run list (plan.json)      submit   slurm job arrays, or local processes
    collect    run list x metrics.jsonl      fit      isoFLOP, L(N, D), bootstrap, multiplier
    plots      PNGs of the fits              cli      the five verbs
"""
