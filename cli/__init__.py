"""The `apiary` command: runs a queen or hive, brings up a one-machine cluster (`up`), writes
certificates (`certs`), and talks to a running cluster. The one package allowed to import every
tier; nothing imports it."""
