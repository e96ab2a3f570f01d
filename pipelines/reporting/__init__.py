"""Reporting: artifacts' markdown, the explorer report, quality, plots."""
