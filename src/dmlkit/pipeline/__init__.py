"""The stages wired to the cache.

- `context`: one run's config, folders, competition adapter and table (`Context`);
- `executor`: the `Stage` description and the cache protocol every stage runs through;
- `ranks`: who computes under torchrun; `planning`: what `./run.sh plan` reports instead;
- `checks`: every check made before anything runs;
- `rounds`: pseudo-label rounds (each round's contexts and training rows);
- `table`: the stages in order (`STAGES`), read by the CLI, `plan`, `runs` and `clean`.

Each stage's runner (`run_folds`, `run_train`, ...) lives with its stage under `dmlkit.stages`.
"""
