"""What the CLI reports as a usage mistake (exit status 2), not as a failed call."""


class CliError(Exception):
    pass
