"""Code every tier shares: security, server plumbing, logging, clocks, validation, proto helpers.
It imports no tier (queen, hive, worker) and nothing built on them (the CLI lives in `cli/`)."""
