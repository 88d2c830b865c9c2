"""The OpenAI-compatible HTTP layer (FastAPI) over `engine.Engine`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health.
Requests are validated here, by hand (OpenAI's error body and status codes, not FastAPI's 422):
malformed JSON, a known field of the wrong type or out of range, n != 1, a prompt with no room
left in max_length -> 400 {"error": {"message", "type", "param", "code"}}; a full wait queue ->
429; a missing or wrong `Authorization: Bearer KEY` when the server has an API key -> 401
(GET /health stays open for probes).  Unknown fields are ignored, as OpenAI's server does; known
fields this server cannot honour (logprobs, n > 1, penalties, tools, ...) are refused, never
silently dropped.  Any other failure is a 500 with the same body; the process keeps serving.

`stream: true` answers with server-sent events in OpenAI's chunk format, ending `data: [DONE]`;
a client that disconnects (mid-stream or while waiting for a non-streamed answer) has its request
cancelled, which frees its slot before the next decode step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request as HttpRequest, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ..data.records import Conversation, RecordError, parse_messages
from ..data.templates import generation_prompt_ids
from .engine import Engine, Event, PromptTooLong, QueueFull, Request

log = logging.getLogger("llama_jax.serve")
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- validation
def _get(body: dict, name: str, types, default=None, *, nullable: bool = True):
    if name not in body or (body[name] is None and nullable):
        return default
    v = body[name]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):  # JSON true is no number
        names = " or ".join(t.__name__ for t in types)
        raise ApiError(400, f"field '{name}' must be {names}, got {type(v).__name__} {json.dumps(v)[:40]}", name)
    return v


def _number(body, name, default, lo, hi, lo_open=False):
    v = _get(body, name, (int, float), default)
    if v is None:
        return default
    v = float(v)
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"field '{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


@dataclass
class Sampling:
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


UNSUPPORTED = {  # field -> the value(s) meaning "off", which are accepted
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "tools": (None, []), "functions": (None, []), "suffix": (None, ""),
}


def parse_sampling(body: dict, *, chat: bool) -> Sampling:
    n = _get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, f"only n=1 is supported, got n={n}", "n")
    for f, off in UNSUPPORTED.items():
        if body.get(f) not in off:
            raise ApiError(400, f"field '{f}' is not supported by this server (value {json.dumps(body[f])[:40]})", f)
    mt = _get(body, "max_tokens", int)
    if chat:
        mct = _get(body, "max_completion_tokens", int)
        mt = mct if mct is not None else mt
    if mt is not None and mt <= 0:
        raise ApiError(400, f"max_tokens must be at least 1, got {mt}", "max_tokens")
    stop = _get(body, "stop", (str, list), None)
    if isinstance(stop, str):
        stop = [stop]
    stop = stop or []
    if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "field 'stop' must be a non-empty string or a list of up to 16 non-empty strings", "stop")
    top_k = _get(body, "top_k", int, 0)
    if top_k < 0:
        raise ApiError(400, f"field 'top_k' must be >= 0 (0 = off), got {top_k}", "top_k")
    so = _get(body, "stream_options", dict, {}) or {}
    return Sampling(mt, _number(body, "temperature", 1.0, 0.0, 2.0), _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                    top_k, _get(body, "seed", int), tuple(stop), bool(_get(body, "stream", bool, False)),
                    bool(so.get("include_usage", False)), bool(_get(body, "ignore_eos", bool, False)))


def _text_content(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise ApiError(400, f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                               "supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    return content


def chat_prompt_ids(body: dict, tokenizer, template) -> list[int]:
    msgs = _get(body, "messages", list)
    if not msgs:
        raise ApiError(400, "field 'messages' is required: a non-empty list of {role, content}", "messages")
    clean = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{j}] must be an object, got {type(m).__name__}", "messages")
        clean.append({"role": m.get("role"), "content": _text_content(m.get("content"), f"messages[{j}]")})
    try:
        system, turns = parse_messages(clean, "messages")
    except RecordError as e:
        raise ApiError(400, str(e), "messages") from None
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message (roles alternate user/assistant after an "
                       "optional first system message)", "messages")
    try:
        return generation_prompt_ids(Conversation(system, turns), tokenizer, template)
    except ValueError as e:
        raise ApiError(400, f"messages: the chat template failed: {e}", "messages") from None


def completion_prompt_ids(body: dict, tokenizer) -> list[int]:
    if "prompt" not in body:
        raise ApiError(400, "field 'prompt' is required", "prompt")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "field 'prompt' is empty", "prompt")
        return list(tokenizer(p)["input_ids"])
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = len(tokenizer)
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"field 'prompt': token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return list(p)
    raise ApiError(400, "field 'prompt' must be a string, a list of token ids, or a list holding one of those "
                   "(several prompts: send several requests)", "prompt")


# ----------------------------------------------------------------------------- the app
def create_app(engine: Engine, tokenizer, *, model_name: str, template=None, api_key: str | None = None):
    """The FastAPI application.  `template`: the chat template (name or data.templates.Template)."""
    app = FastAPI(title="llama-jax serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    capped_said = [False]

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                      type_="authentication_error", code="invalid_api_key"))
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - never let a request take the server down
            log.exception("serve: request failed")
            return error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llama_jax"}]}

    async def read_body(request: HttpRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    async def handle(request: HttpRequest, chat: bool):
        try:
            body = await read_body(request)
            sp = parse_sampling(body, chat=chat)
            ids = chat_prompt_ids(body, tokenizer, template) if chat else completion_prompt_ids(body, tokenizer)
            queue: asyncio.Queue[Event] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            req = Request(ids, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.stop, sp.ignore_eos,
                          on_event=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
            try:
                engine.submit(req)
            except PromptTooLong as e:
                raise ApiError(400, f"{e} (prompt: {len(ids)} tokens)", "messages" if chat else "prompt",
                               code="context_length_exceeded") from None
            except QueueFull as e:
                raise ApiError(429, f"the server is busy: {e}; retry later", type_="rate_limit_error") from None
        except ApiError as e:
            return error(e)
        if req.capped and not capped_said[0]:
            capped_said[0] = True
            log.warning("serve: max_tokens larger than the context left (max_length=%d - prompt) is capped to it "
                        "(said once)", engine.cfg.max_length)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        if sp.stream:
            return StreamingResponse(_stream(req, queue, meta, chat, sp.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, ev = [], None
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(req)
                        return Response(status_code=499)  # nobody reads it; nginx's "client closed"
                    continue
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        if ev.finish_reason == "error":
            return error(ApiError(500, f"generation failed: {ev.error}", type_="server_error"))
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = ev.finish_reason
        return {**meta, "choices": [choice], "usage": _usage(ev)}

    async def _stream(req, queue, meta, chat, include_usage):
        def chunk(delta_or_text, finish=None, usage=None):
            obj = dict(meta, object="chat.completion.chunk" if chat else "text_completion")
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
            obj["choices"] = [choice] if usage is None else []
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        done = False
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await queue.get()
                if ev.finish_reason is None:
                    if ev.text:
                        yield chunk({"content": ev.text} if chat else ev.text)
                    continue
                done = True
                if ev.finish_reason == "error":
                    err = ApiError(500, f"generation failed: {ev.error}", type_="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                if ev.text:
                    yield chunk({"content": ev.text} if chat else ev.text)
                yield chunk({} if chat else "", ev.finish_reason)
                if include_usage:
                    yield chunk(None, usage=_usage(ev))
                break
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (the response task was cancelled): free the slot
                engine.cancel(req)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await handle(request, chat=True)

    return app


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}
