"""The golden-layer study: what answers "which layer should I edit?" from data.

Its one instrument is the **single-edit matrix** (every edit edited alone at every layer),
kept in a **study folder** that every verb reads and writes:

* :mod:`gradlocate.golden.folder` - the study folder (manifest, cells, selections, batch,
  judgment, draws) and the proxy rule;
* :mod:`gradlocate.golden.store` - the record store every resumable part writes to;
* :mod:`gradlocate.golden.matrix` - filling the matrix with any registered editor;
  :mod:`gradlocate.golden.table` - the :class:`~gradlocate.golden.table.Matrix` it reads as;
* :mod:`gradlocate.golden.scores` - every definition of "overall", the golden layer, the damage gate;
  :mod:`gradlocate.golden.inference` - bootstrap, paired tests, transfer, rank agreement;
  :mod:`gradlocate.golden.oracle` - the cross-fitted oracle gain, equivalence, Holm;
* :mod:`gradlocate.golden.judge` - one matrix judged; :mod:`gradlocate.golden.draws` - the
  selectors over several proxy draws; :mod:`gradlocate.golden.report` - study folders judged
  and written up (``gradlocate report``);
* :mod:`gradlocate.golden.sweep` - the batch regime: all edits edited together at every layer;
  :mod:`gradlocate.golden.compare` - selectors judged against a sweep;
  :mod:`gradlocate.golden.study` - the whole study in one call.
"""

from gradlocate.golden.oracle import equivalence, holm, oracle_gain

__all__ = ["oracle_gain", "equivalence", "holm"]
