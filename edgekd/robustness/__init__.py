"""Robustness under image corruptions: seeded uint8 corruptions (torch-free) and their evaluation."""
