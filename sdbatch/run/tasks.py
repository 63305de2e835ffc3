"""Independent pieces of work (an export's output shards) in Ray tasks across the cluster: a
few in flight per CPU, each result yielded as its task finishes, a task lost with its node
retried by Ray. The readers above, which import no Ray themselves, are handed ``ray_tasks``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import TypeVar

import ray

from sdbatch.run.cluster import connect_ray

Item = TypeVar("Item")
Result = TypeVar("Result")

IN_FLIGHT_PER_CPU = 2  # enough queued for every CPU to go on at once; results come back as they finish
TASK_RETRIES = 3  # a task whose worker or node died is run again (its output is written whole, once)


def ray_tasks(address: str | None) -> Callable[[Callable[[Item], Result], list[Item]], Iterator[Result]]:
    """``run(fn, items)``: ``fn`` over ``items`` in Ray tasks on the cluster at ``address`` (a
    local one if None and no ``RAY_ADDRESS``), started only when first called. ``fn`` must be
    a module-level function, which the workers import. An exception ``fn`` raised is raised
    here as itself."""

    def run(fn: Callable[[Item], Result], items: list[Item]) -> Iterator[Result]:
        if not items:
            return
        connect_ray(address)
        remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(fn)
        limit = max(2, int(ray.cluster_resources().get("CPU", 1) * IN_FLIGHT_PER_CPU))
        waiting = iter(items)
        pending = [remote.remote(item) for item in islice(waiting, limit)]
        try:
            while pending:
                [ready], pending = ray.wait(pending, num_returns=1)
                pending += [remote.remote(item) for item in islice(waiting, 1)]
                try:
                    yield ray.get(ready)
                except ray.exceptions.RayTaskError as exc:
                    raise exc.cause from None
        finally:
            for ref in pending:
                ray.cancel(ref)

    return run
