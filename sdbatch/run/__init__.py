"""Running a job on Ray: the plan, the scheduling policy, the driver and the cluster, the worker
actor with its feed and shard runner, the worker-driver protocol, progress and metrics. May
import: ``output``, ``manifest``, ``spec``, ``models`` (the torch runtime lazily, in the worker),
``storage``, ``data``, ``errors``; ray."""
