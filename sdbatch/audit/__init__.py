"""Reading a job back: opening OUT, verify (the index against commits, objects and hashes),
reproduce (regenerate and compare bytes), and report.html. May import: ``run`` (progress texts),
``output``, ``manifest``, ``spec``, ``models`` (the runtime lazily, when regenerating),
``storage``, ``data``, ``errors``."""
