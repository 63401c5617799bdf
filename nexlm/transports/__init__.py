"""Front doors onto the chat layer: WebSocket, Server-Sent Events and the small HTTP API."""
