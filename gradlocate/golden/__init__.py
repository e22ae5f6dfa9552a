"""The golden-layer study: what answers "which layer should I edit?" from data.

* :mod:`gradlocate.golden.store` - the record store every resumable part writes to;
* :mod:`gradlocate.golden.matrix` - the single-edit matrix (every edit alone at every layer);
* :mod:`gradlocate.golden.sweep` - the batch regime: all edits edited together, at every layer;
* :mod:`gradlocate.golden.compare` - every selector judged against the sweep;
* :mod:`gradlocate.golden.study` - the golden-layer study (selectors vs the sweep).
"""
