"""Ray Serve's own cost per request on this machine: a no-op app that reads the request body and
answers `x-answer-bytes` bytes. bench/serve_overhead.py deploys it beside the service (same
cluster, same ingress mode) and times it alternating with the service's route."""

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

api = FastAPI()


@serve.deployment(name="ServeFloor", max_ongoing_requests=64)
@serve.ingress(api)
class ServeFloor:
    def __init__(self):
        self.answer = b""

    @api.get("/")
    async def here(self) -> dict:  # how the bench finds this replica's own port (direct ingress)
        return {}

    @api.post("/")
    async def echo(self, request: Request) -> Response:
        await request.body()  # read like a route reads its JSON
        n = int(request.headers.get("x-answer-bytes", "0"))
        if len(self.answer) != n:
            self.answer = bytes(n)
        return Response(self.answer, media_type="image/png")


app = ServeFloor.bind()
