"""Which worker takes a request: the router's picks behind the desk's one door."""
