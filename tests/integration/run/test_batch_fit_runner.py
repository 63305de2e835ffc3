"""Batch size from memory through a real ShardRunner on CPU, the memory probe injected: a
canonical batch larger than what "fits" is generated in parts of the fitting size, each
recorded as its own batch, and `reproduce` rebuilds each part byte for byte."""

from __future__ import annotations

from conftest import load_index, write_manifest

from integration.audit.test_reproduce import run_in_process
from sdbatch.run.batch_fit import BatchFit


class Probe:
    """Pretends that more than ``fits`` rows run out of memory; records what was probed."""

    def __init__(self, fits: int):
        self.fits, self.probed = fits, []

    def __call__(self, rows, conditioning):
        self.probed.append(len(rows))
        return None if len(rows) > self.fits else 1000 + 100 * len(rows)


def test_batches_are_cut_to_the_size_that_fits_and_reproduce(tiny_generator, tmp_path):
    from sdbatch.audit.reproduce import reproduce_row

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"b{i}", "prompt": f"a red square {i}", "seed": i}
                                                       for i in range(6)])
    probe = Probe(fits=2)
    fit = BatchFit(6, probe, capacity_bytes=2000)  # the estimate (9 rows, capped at 5) does not fit: halved to 2
    run_in_process(tiny_generator, manifest, tmp_path / "out", [0], batch_fit=fit,
                   spec_overrides={"defaults.steps": 2, "resources.batch_size": 6, "defaults.width": 32,
                                   "defaults.height": 32})
    assert probe.probed == [6, 1, 2, 5]  # measured once for the one batch key
    entries = load_index(tmp_path / "out")
    assert [e["batch_rows"] for e in entries] == [["b0", "b1"]] * 2 + [["b2", "b3"]] * 2 + [["b4", "b5"]] * 2
    assert len({e["batch_id"] for e in entries}) == 1  # parts of one canonical batch, as the OOM halves are
    for rid in ("b1", "b4"):
        result = reproduce_row(str(tmp_path / "out"), rid)
        assert result.match and result.batch_rebuilt, result.notes
