"""Reports of a search directory: its tables (:mod:`.data`, pure), the figures (:mod:`.plots`), the exported models
measured (:mod:`.measure`) and the HTML / Markdown / JSON pages (:mod:`.pages`), put together by :mod:`.build`."""

from .build import ReportConfig, ReportResult, build_report
from .data import ReportError, SearchTables, read_search

__all__ = ["ReportConfig", "ReportError", "ReportResult", "SearchTables", "build_report", "read_search"]
