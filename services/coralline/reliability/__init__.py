"""Reliability: fuzzing, faults under load and a soak test on the real stack
(`coralline reliability`)."""
