"""DNS front end: answers A, AAAA and SRV queries for services from the node's local state."""
