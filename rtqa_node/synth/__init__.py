"""Synthetic head-and-neck radiotherapy cohorts: phantom anatomy, planning CT, RTSTRUCT, RTPLAN, RTDOSE,
protocol deviations, outcomes from NTCP/TCP models, and reviewer labels (``rtqa synth``)."""

from rtqa_node.synth.cohort import CohortConfig, generate_cohort, simulate_patient, summarise

__all__ = ["CohortConfig", "generate_cohort", "simulate_patient", "summarise"]
