"""Pure tests, one folder per package of sdbatch: no Ray, no subprocess, no S3 server, no model
weights. The quick loop: ``python -m pytest tests/unit -n 0 -q`` (well under a minute)."""
