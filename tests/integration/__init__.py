"""Tests through the real machinery: a local Ray cluster, the moto S3 server, the CLI as a
subprocess, the tiny models, injected faults and chaos. The helpers live here too: ``faults``
(S3 faults), ``chaos`` (killed, hung, failing workers), ``faulty_sdbatch`` (the CLI with both
installed) and ``model_families`` (tiny random-weight pipelines of every supported family)."""
