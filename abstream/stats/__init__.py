"""The statistics core for experiment results: pure functions of sufficient statistics (no I/O).

See docs/statistics.md for every formula, its reference and the reason codes.
"""

from abstream.stats.analysis import analyze_metric
from abstream.stats.checks import SRM_THRESHOLD, holm_adjust, srm_check
from abstream.stats.models import AnalysisOptions, MetricType, VariantMoments

__all__ = [
    "SRM_THRESHOLD",
    "AnalysisOptions",
    "MetricType",
    "VariantMoments",
    "analyze_metric",
    "holm_adjust",
    "srm_check",
]
