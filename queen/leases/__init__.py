"""Direct leases: a slot reserved for a client that calls the worker itself."""
