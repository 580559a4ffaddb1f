"""Embedding training and its tools: InfoNCE training on Ray Train, hard-negative mining, MTEB evaluation.

Modules, by job:

- ``config`` (TrainConfig), ``data`` (training records, the batch of each step), ``recipe`` (what a run's
  weights are a function of, recorded in its folder), ``trainer`` (the driver: ``run_training``), ``worker``
  (one Ray Train worker's loop), ``checkpoints`` (a run's step_N folders, complete when all their files are, on any
  filesystem), ``placement`` (workers sized to fit the nodes, a run folder every node reaches), ``run_lock`` (one
  training at a time per run folder);
- ``identity``: a model by its content (a recipe's backbone, the model whose eval scores are reused);
- ``model``, ``pooling``, ``loss``, ``gradcache``: the embedder, InfoNCE and the chunked backward;
- ``encode`` (any backbone or checkpoint as a text embedder), ``jsonl`` (pairs files), ``mine`` (hard negatives);
- ``eval_tasks`` (task specs), ``mteb_adapter`` (what mteb sees), ``evaluate`` (the eval job);
- ``cli``: the verbs ``train``, ``mine-negatives`` and ``eval``.
"""
