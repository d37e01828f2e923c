"""Rule-based review checks: plan integrity, trial protocols, TG-263 names, contour QA.

``review_plan_study(study, *, protocol) -> Review`` (pure) is in :mod:`rtqa_node.checks.pipeline`.
"""

from rtqa_node.checks.pipeline import load_and_review, review_plan_study

__all__ = ["load_and_review", "review_plan_study"]
