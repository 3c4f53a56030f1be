"""The worker tier: one OS process serving one model through one inference backend."""
