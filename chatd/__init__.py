"""chatd: a real-time chat daemon speaking WebSocket, SignalR and gRPC on one hub."""

__version__ = "0.1.0"
