"""The one boundary to Ray: the run's actors, the waits on them, the weight push, recovery.

Read in this order; each file is one room:

    placement.py    where actors go and what the run holds: bundles, demand, shortfall, sync
                    ranks, shares (pure; gmai_rl.plan imports it without Ray)
    environment.py  where the driver runs and what the actors get: the job's temporary folder,
                    the actors' environment variables (pure)
    errors.py       what a stage can end with: timeouts, deaths (pure)
    session.py      Ray for one run: init, resource check, the placement group
    waits.py        `gather`, the one wait on remote calls, and its policies
    actors.py       the learner ranks, rollout workers and reward workers, started in place
    weight_sync.py  `WeightSync`: the sync group, its plans, versions, pushes and aborts
    recovery.py     `Recovery`: which dead workers are replaced, when, within what limit
    cluster.py      `Cluster`: start and stop, and every stage the driver runs

This package's own import loads nothing: import from the module you need (e.g.
`from gmai_rl.cluster.cluster import Cluster`). Everything outside it that talks to Ray is the
actors' own code (rollout/, learner/, reward/worker.py) and the driver's gauges in
gmai_rl.ray_metrics.
"""
