"""The submit use case: validate → preflight (``preflight``: request, settings, validation,
``PreparedJob``) → claim, plan, run, merge (``run.driver.run_job``) → report (``submit``), and the
read-only dry run on the same path (``dry_run``); the ``--repair`` row selection (``repair``).
May import: ``audit``, ``run``, ``output``, ``manifest``, ``spec``, ``models``, ``storage``,
``data``, ``errors``. No printing: it returns values the CLI prints."""
