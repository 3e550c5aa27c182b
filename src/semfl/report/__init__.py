"""Figures and HTML reports for runs and sweeps."""
from semfl.report.run_report import write_run_report

__all__ = ["write_run_report"]
