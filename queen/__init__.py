"""The queen tier: the cluster registry, request routing, and the client and admin APIs."""
