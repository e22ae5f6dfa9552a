"""The study layer: what answers "which layer should I edit?" from data.

* :mod:`gradlocate.study.store` - the record store every resumable part writes to;
* :mod:`gradlocate.study.matrix` - the single-edit matrix (every edit alone at every layer);
* :mod:`gradlocate.study.study` - the golden-layer study (selectors vs the sweep).
"""
