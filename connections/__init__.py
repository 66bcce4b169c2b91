"""Connection types and the connection registry."""
