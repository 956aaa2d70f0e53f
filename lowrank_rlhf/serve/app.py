"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions and /v1/completions, streamed as
server-sent events when asked, errors in OpenAI's JSON form with a 4xx status. Any OpenAI client talks to it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .engine import Cancelled, Engine, RequestError
from .feedback import feedback_router


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request (one base, one generation at a time)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def build_app(engine: Engine, api_key: str | None = None, feedback: tuple[str, str] | None = ("sft", "policy")
              ) -> FastAPI:
    """The API; with `feedback` (two of the run's models) also the preference page (feedback.py)."""
    app = FastAPI(title="lowrank_rlhf", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path != "/feedback":  # the page itself sends the key (?key=)
            sent = request.headers.get("authorization", "")
            if not secrets.compare_digest(sent, f"Bearer {api_key}"):
                return error(401, "Incorrect API key provided", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return error(err.status, str(err), err.param, err.code)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "lowrank_rlhf"}
                                           for m in engine.models]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        ids = engine.chat_ids([m.model_dump() for m in body.messages])
        return await respond(body, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await respond(body, engine.text_ids(body.prompt), chat=False)

    async def respond(body: Sampling, ids: list[int], chat: bool):
        max_tokens = engine.check(body.model, ids, body.max_completion_tokens or body.max_tokens)
        args = dict(temperature=body.temperature, top_p=body.top_p, stop=body.stops(), seed=body.seed)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(stream(body.model, ids, max_tokens, args, rid, chat),
                                     media_type="text/event-stream")
        result = await run_in_threadpool(engine.generate, body.model, ids, max_tokens, **args)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}} if chat
                  else {"index": 0, "text": result.text, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [{**choice, "finish_reason": result.finish_reason}], "usage": usage}

    async def stream(model: str, ids: list[int], max_tokens: int, args: dict, rid: str, chat: bool):
        """SSE chunks as the text is made; a client that disconnects cancels its generation (its slot is freed)."""
        streamer, cancelled, done = engine.streamer(), Cancelled(), {}

        def work():
            try:
                done["result"] = engine.generate(model, ids, max_tokens, streamer=streamer, cancelled=cancelled,
                                                 **args)
            except BaseException as err:  # reported in the stream; the streamer must end either way
                done["error"] = err
                streamer.end()

        def chunk(delta: str | None, finish: str | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": {"content": delta} if delta is not None else {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": int(time.time()), "model": model, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        stops, sent, text = args["stop"], 0, ""
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may be split across pieces
        try:
            if chat:
                yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': int(time.time()), 'model': model, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"  # noqa: E501
            iterator = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, iterator, None)
                if piece is None:
                    break
                text += piece
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                upto = cut if cut >= 0 else max(sent, len(text) - hold)
                if upto > sent:
                    yield chunk(text[sent:upto])
                    sent = upto
                if cut >= 0:
                    break
            await asyncio.to_thread(thread.join)
            if "error" in done:
                yield f"data: {json.dumps({'error': {'message': str(done['error']), 'type': 'server_error'}})}\n\n"
                return
            result = done["result"]
            if len(result.text) > sent:
                yield chunk(result.text[sent:])
            yield chunk(None, result.finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            cancelled.event.set()  # a no-op after a finished generation; ends one whose client left

    if feedback is not None:
        app.include_router(feedback_router(engine, feedback))
    return app
