"""The use cases behind the commands that sequence several packages: the submit dry run and the
``--repair`` row selection. May import: ``audit``, ``run``, ``output``, ``manifest``, ``spec``,
``models``, ``storage``, ``data``, ``errors``. No printing: it returns values the CLI prints."""
