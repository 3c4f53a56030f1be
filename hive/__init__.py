"""The hive tier: one per machine; spawns and supervises worker processes, heartbeats the queen."""
