"""Pieces every tier shares: the `apiary` CLI, logging, server plumbing, clocks."""
