"""Reports: data gathered from search outputs (pure), the figures, and the HTML / Markdown report."""

from .build import ReportConfig, ReportResult, build_report
from .data import ReportError, SearchTables, read_search

__all__ = ["ReportConfig", "ReportError", "ReportResult", "SearchTables", "build_report", "read_search"]
