"""The pruning report: a versioned, machine-readable ``report.json`` and a human report.

* :mod:`.document`: the JSON document (:func:`build_report`; a prune's, quality guard included:
  :func:`make_report`; schema ``lorp/schemas/report.schema.json``, JSON Schema draft 2020-12)
  and the summary a service job stores, read from it (:func:`job_summary`); an earlier
  version's document upgraded to this one (:func:`migrate_report`);
* :mod:`.prose`: each method's label and prose, from the method registry (:mod:`lorp.methods`);
* :mod:`.plots`: the heatmap of S with the phases and the removed blocks marked and the speedup
  chart and a quality target's quality-vs-depth curve (matplotlib);
* :mod:`.html`: ``report.html`` (self-contained: the images are embedded, so the file can be
  downloaded and opened alone) and its Markdown twin ``report.md`` (images referenced
  relatively);
* :mod:`.files`: :func:`write_reports` writes all of it, with the similarity matrix
  (``similarity.npy``), into one folder.
"""

from __future__ import annotations

from .document import (
    REPORT_SCHEMA_VERSION,
    SCHEMA_PATH,
    STATUSES,
    build_report,
    job_summary,
    json_safe,
    load_schema,
    make_report,
    migrate_report,
)
from .files import write_reports
from .html import render_html, render_markdown, speed_headline
from .plots import plot_depth, plot_heatmap, plot_speedup
from .prose import explain, method_label

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "SCHEMA_PATH",
    "STATUSES",
    "build_report",
    "explain",
    "job_summary",
    "json_safe",
    "load_schema",
    "make_report",
    "method_label",
    "migrate_report",
    "plot_depth",
    "plot_heatmap",
    "plot_speedup",
    "render_html",
    "render_markdown",
    "speed_headline",
    "write_reports",
]
