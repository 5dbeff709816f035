"""The public client: a connection per node, retries across nodes, and a blocking wrapper."""

from registry.client.client import DEFAULT_ENDPOINTS, Client, ConnectionFailed, SyncClient, client_ssl_context

__all__ = ["Client", "SyncClient", "ConnectionFailed", "DEFAULT_ENDPOINTS", "client_ssl_context"]
