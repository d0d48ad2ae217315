"""The hot path: client-facing and server-facing asyncio Protocols for HTTP and TCP."""
