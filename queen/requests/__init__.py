"""One request from its acceptance to its record: route, record, retry, endings, admission."""
