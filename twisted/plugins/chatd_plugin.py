from twisted.application.service import ServiceMaker

chatd = ServiceMaker(
    "chatd",
    "chatd.tap",
    "A real-time chat daemon: WebSocket, SignalR and gRPC clients in the same rooms.",
    "chatd",
)
