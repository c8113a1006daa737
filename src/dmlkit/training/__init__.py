"""Training one member, by phase: `data` (its fold's rows, targets, crops and dataset), `setup`
(networks, optimizer, schedule, the run's state), `loop` (an epoch, validation) and `checkpoints`
(resume, best/final weights). The stage that calls them is `dmlkit.stages.train`."""
