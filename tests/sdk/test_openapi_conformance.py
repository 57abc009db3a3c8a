"""Wire conformance: triage's answers, as bytes on the wire, against OpenAI's OpenAPI document.

The SDK tests check that the official client accepts triage's answers; the SDK is lenient (a
`null` where OpenAI's schema has a string passes its models). This test reads the raw JSON and
validates it:

- against OpenAI's published OpenAPI document, pinned in tests/sdk/openapi/openai-1.2.0.json
  (provenance and checksum in tests/sdk/openapi/PROVENANCE.md), with an OpenAPI 3.0 validator:
  moderations, the model list and one model, transcriptions as `json`, chat completions;
- for what that version predates (streamed chunks, error bodies, `verbose_json`, the fields
  a chat completion has gained since), against tests/sdk/openapi/supplement.json, triage's
  own schemas of the shapes OpenAI's API reference documents today.

Every OpenAI-shaped answer must also hold no `null` except where a schema allows one (the
`triage` extension objects are triage's own and are not checked for that). The non-JSON
transcription formats (`text`, `srt`, `vtt`) are checked for their content type and syntax.

Every test runs over TCP with a bearer key and over the unix socket. Chat runs on the config
server of test_chat_sdk.py and is skipped with it (TRIAGE_SKIP_LLAMA=1). Run through
scripts/test-sdk.
"""

import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_schema_validator import OAS30Validator
from servers import ChatServer, Server

HERE = Path(__file__).parent / "openapi"
PINNED = HERE / "openai-1.2.0.json"
PINNED_SHA256 = "ee9f17550d81b1ebb1f78c3c92020e0e59441e3609557cee93ec5bd4ccc82e80"
INSULT = "you are a disgusting worthless idiot"
KIND = "thank you, have a lovely day"


def load_pinned() -> dict:
    raw = PINNED.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    assert digest == PINNED_SHA256, f"{PINNED} changed (sha256 {digest}); see PROVENANCE.md"
    return json.loads(raw)


DOC = load_pinned()
SUPPLEMENT = json.loads((HERE / "supplement.json").read_text())


class Schema:
    """One schema, from the pinned document (an operation's answer) or the supplement."""

    def __init__(self, source: str, schema: dict, validator):
        self.source = source
        self.schema = schema
        self.validator = validator

    def check(self, body, nulls_checked: bool = True) -> None:
        """Valid against the schema and, unless `nulls_checked` is false (the answer's
        fields are newer than this schema: another schema rules on them), no null where
        the schema does not allow one."""
        errors = sorted(self.validator.iter_errors(body), key=lambda e: list(e.path))
        assert not errors, f"{self.source}: " + "; ".join(
            f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:5]
        )
        for path in nulls(body) if nulls_checked else ():
            assert self.allows_null(path), f"{self.source}: null at {path}, which the schema does not allow"

    def allows_null(self, path: tuple) -> bool:
        """Whether the schema that applies at `path` accepts null (OpenAPI 3.0: `nullable`)."""
        sub = subschema(self.schema, path, self.root())
        if sub is None:
            return False
        if self.source.startswith("OpenAI"):
            return bool(sub.get("nullable"))
        return Draft202012Validator({**sub, "$defs": SUPPLEMENT["$defs"]}).is_valid(None)

    def root(self) -> dict:
        return DOC if self.source.startswith("OpenAI") else SUPPLEMENT


def nulls(body, path=()):
    """Paths of every null in an answer, outside triage's own `triage` extension objects."""
    if body is None:
        yield path
    elif isinstance(body, dict):
        for k, v in body.items():
            if k == "triage":
                continue
            yield from nulls(v, path + (k,))
    elif isinstance(body, list):
        for i, v in enumerate(body):
            yield from nulls(v, path + (i,))


def resolve(schema: dict, root: dict) -> dict:
    while isinstance(schema, dict) and "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def subschema(schema: dict, path: tuple, root: dict):
    """The schema that applies at `path` (object properties and array items; for `oneOf`
    the branch that is not `null`), or None where the schema says nothing."""
    schema = resolve(schema, root)
    for part in path:
        if "oneOf" in schema:
            branches = [resolve(b, root) for b in schema["oneOf"]]
            branches = [b for b in branches if b.get("type") != "null"]
            schema = branches[0] if branches else {}
        if isinstance(part, int):
            schema = schema.get("items")
        else:
            schema = (schema.get("properties") or {}).get(part)
        if schema is None:
            return None
        schema = resolve(schema, root)
    return schema


def pinned(path: str, method: str) -> Schema:
    """The pinned document's schema for an operation's 200 answer in JSON."""
    op = DOC["paths"][path][method]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    validator = OAS30Validator({**schema, "components": DOC["components"]})
    return Schema(f"OpenAI 1.2.0 {method.upper()} {path}", schema, validator)


def supplement(name: str) -> Schema:
    schema = {"$ref": f"#/$defs/{name}"}
    validator = Draft202012Validator({**schema, "$defs": SUPPLEMENT["$defs"]})
    return Schema(f"supplement {name}", schema, validator)


def test_pinned_document_is_openais():
    assert DOC["info"]["title"] == "OpenAI API"
    assert DOC["info"]["version"] == "1.2.0"
    for path in ["/moderations", "/models", "/models/{model}", "/audio/transcriptions", "/chat/completions"]:
        assert path in DOC["paths"], path


def test_the_checker_rejects_what_the_schemas_forbid():
    """The checks can fail: known-bad answers are refused."""
    fingerprint_null = {
        "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
    }
    with pytest.raises(AssertionError, match="system_fingerprint"):
        supplement("ChatCompletionChunk").check(fingerprint_null)
    with pytest.raises(AssertionError, match="owned_by"):
        pinned("/models/{model}", "get").check({"id": "m", "object": "model", "created": 0})
    with pytest.raises(AssertionError, match="null at"):
        pinned("/models/{model}", "get").check(
            {"id": "m", "object": "model", "created": 0, "owned_by": "x", "parent": None}
        )
    with pytest.raises(AssertionError, match="param"):
        supplement("ErrorResponse").check({"error": {"message": "m", "type": "t", "code": None}})


# ------------------------------------------------------------------ servers


def clients(base_url: str, key: str, socket: str):
    return {
        "tcp": httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120),
        "unix": httpx.Client(
            base_url="http://triage/v1", transport=httpx.HTTPTransport(uds=socket), timeout=120
        ),
    }


@pytest.fixture(scope="module", params=["tcp", "unix"])
def http(request, server: Server):
    all_ = clients(server.base_url, server.key, server.socket)
    yield all_[request.param]
    for c in all_.values():
        c.close()


@pytest.fixture(scope="module", params=["tcp", "unix"])
def chat_http(request, chat_server: ChatServer):
    all_ = clients(chat_server.base_url, chat_server.key, chat_server.socket)
    yield all_[request.param]
    for c in all_.values():
        c.close()


def json_answer(response: httpx.Response, status: int = 200):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return response.json()


def check_error(response: httpx.Response, status: int) -> dict:
    body = json_answer(response, status)
    supplement("ErrorResponse").check(body)
    return body["error"]


# -------------------------------------------------------------- moderations


@pytest.mark.parametrize("text", [INSULT, [INSULT, KIND]])
def test_moderations(http: httpx.Client, text):
    body = json_answer(http.post("/moderations", json={"model": "omni-moderation-latest", "input": text}))
    pinned("/moderations", "post").check(body)
    assert len(body["results"]) == (1 if isinstance(text, str) else 2)
    assert body["results"][0]["flagged"] is True


def test_moderations_errors(http: httpx.Client):
    check_error(http.post("/moderations", content=b"{not json", headers={"content-type": "application/json"}), 400)
    check_error(http.post("/moderations", json={"input": 42}), 400)


# ------------------------------------------------------------------- models


def test_models(http: httpx.Client):
    body = json_answer(http.get("/models"))
    pinned("/models", "get").check(body)
    assert body["data"], body
    for model in body["data"]:
        one = json_answer(http.get(f"/models/{model['id']}"))
        pinned("/models/{model}", "get").check(one)
        assert one == model


def test_unknown_model_is_an_error_body(http: httpx.Client):
    error = check_error(http.get("/models/no-such-model"), 404)
    assert error["code"] == "model_not_found"


def test_wrong_key_is_an_error_body(server: Server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer wrong"}) as c:
        error = check_error(c.get("/models"), 401)
    assert error["code"] == "invalid_api_key"


# ----------------------------------------------------------- transcriptions


def transcribe(http: httpx.Client, server: Server, response_format: str, **extra) -> httpx.Response:
    clip = Path(server.clip)
    data = {"model": "whisper-1", "response_format": response_format, **extra}
    files = {"file": (clip.name, clip.read_bytes(), "audio/wav")}
    return http.post("/audio/transcriptions", data=data, files=files)


def test_transcription_json(http: httpx.Client, server: Server):
    body = json_answer(transcribe(http, server, "json"))
    pinned("/audio/transcriptions", "post").check(body)
    assert "forward" in body["text"].lower()


@pytest.mark.parametrize("granularity", [None, "word"])
def test_transcription_verbose_json(http: httpx.Client, server: Server, granularity):
    extra = {"timestamp_granularities[]": granularity} if granularity else {}
    body = json_answer(transcribe(http, server, "verbose_json", **extra))
    pinned("/audio/transcriptions", "post").check(body)
    supplement("TranscriptionVerbose").check(body)
    assert body["segments"]
    if granularity == "word":
        assert body["words"]


def test_transcription_text_formats(http: httpx.Client, server: Server):
    text = transcribe(http, server, "text")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert "forward" in text.text.lower()
    srt = transcribe(http, server, "srt")
    assert srt.status_code == 200 and srt.headers["content-type"].startswith("text/plain")
    assert re.match(r"1\r?\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\r?\n\S", srt.text), srt.text
    vtt = transcribe(http, server, "vtt")
    assert vtt.status_code == 200 and vtt.headers["content-type"].startswith("text/vtt")
    assert re.match(r"WEBVTT\r?\n\r?\n(\S+\r?\n)?\d\d:\d\d(:\d\d)?\.\d{3} --> ", vtt.text), vtt.text


def test_transcription_errors(http: httpx.Client, server: Server):
    check_error(transcribe(http, server, "yaml"), 400)
    broken = {"file": ("x.wav", b"RIFF\x00\x00\x00\x00WAVEnot audio", "audio/wav")}
    response = http.post("/audio/transcriptions", data={"model": "whisper-1"}, files=broken)
    assert response.status_code in (400, 415), response.text
    check_error(response, response.status_code)


# --------------------------------------------------------------------- chat

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_chat_completion(chat_http: httpx.Client):
    body = json_answer(chat_http.post("/chat/completions", json={"model": "chat", "messages": HELLO, "max_tokens": 16}))
    supplement("ChatCompletionCurrent").check(body)
    if body["choices"][0]["message"]["content"] is not None:
        # 1.2.0 knows no refusals (its message content is a string) nor `logprobs`: the
        # supplement rules on those fields' nulls.
        pinned("/chat/completions", "post").check(body, nulls_checked=False)


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_completion_streamed(chat_http: httpx.Client, include_usage: bool):
    request = {"model": "chat", "messages": HELLO, "max_tokens": 16, "stream": True}
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    with chat_http.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks
    schema = supplement("ChatCompletionChunk")
    for chunk in chunks:
        schema.check(chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] is not None and all(f is None for f in finishes[:-1])
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    else:
        assert all("usage" not in c for c in chunks)


def test_chat_errors(chat_http: httpx.Client):
    check_error(chat_http.post("/chat/completions", content=b"[", headers={"content-type": "application/json"}), 400)
    check_error(chat_http.post("/chat/completions", json={"model": "chat", "messages": "hello"}), 400)
