"""End-to-end: chat completions and /v1/execute through the official OpenAI Python SDK, unmodified.

A second `triage serve` runs tests/sdk/chat.toml: its chat task is a one-tier cascade over
SmolLM2-135M-Instruct on a real llama.cpp `llama-server`, its moderation task the local toxicity
specialist alone. SmolLM2 is small and often wrong, so the tests check shapes (objects, roles,
token counts, headers, traces, JSON that matches the schema), never what it knows. Every call
sets a small `max_tokens`: the model rambles otherwise.

Every test that talks to the server runs over TCP with a bearer key (from `[[server.keys]]`)
and over the unix socket. Run through scripts/test-sdk, which starts both servers and sets:

  TRIAGE_SDK_CHAT_BASE_URL   http://127.0.0.1:PORT/v1 of the chat server
  TRIAGE_SDK_CHAT_KEY        the bearer key it accepts on TCP
  TRIAGE_SDK_CHAT_SOCKET     its unix socket path
  TRIAGE_SDK_SKIP_CHAT       "1" when llama-server is not available (TRIAGE_SKIP_LLAMA=1)
"""

import json

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import ModerationCreateResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from servers import ChatServer

CHAT_TASK = "chat"
# The name of the one tier of the chat task in tests/sdk/chat.toml (x-triage-tier).
CHAT_TIER = "smollm2"
MAX_TOKENS = 16
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module", params=["tcp", "unix"])
def client(request, chat_server: ChatServer):
    # A generous timeout and no retries: the model runs on a busy CPU, and a retried request
    # would hide a failure.
    if request.param == "tcp":
        c = OpenAI(
            base_url=chat_server.base_url, api_key=chat_server.key, timeout=120, max_retries=0
        )
    else:
        c = OpenAI(
            base_url="http://triage/v1",
            api_key="unused",
            timeout=120,
            max_retries=0,
            http_client=httpx.Client(transport=httpx.HTTPTransport(uds=chat_server.socket)),
        )
    yield c
    c.close()


def check_usage(usage) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# ---------------------------------------------------------------------- chat


def test_chat_completion(client: OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_TASK, messages=HELLO, max_tokens=MAX_TOKENS
    )
    assert raw.status_code == 200
    assert raw.headers["x-triage-tier"] == CHAT_TIER
    assert float(raw.headers["x-triage-cost-usd"]) >= 0.0
    assert raw.headers["x-request-id"]
    reply = raw.parse()
    assert isinstance(reply, ChatCompletion)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == CHAT_TASK
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.message.content.strip()
    assert choice.message.refusal is None
    check_usage(reply.usage)
    # What the SDK parsed also validates strictly against its type.
    body = raw.http_response.json()
    ChatCompletion.model_validate(body)
    # OpenAI's schema has `system_fingerprint` as a string or absent, never null.
    assert "system_fingerprint" not in body or isinstance(body["system_fingerprint"], str)


def test_chat_completion_with_system_message(client: OpenAI):
    reply = client.chat.completions.create(
        model=CHAT_TASK,
        messages=[{"role": "system", "content": "You are terse."}, *HELLO],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert reply.choices[0].message.content.strip()
    check_usage(reply.usage)


def test_chat_completion_streamed(client: OpenAI):
    stream = client.chat.completions.create(
        model=CHAT_TASK,
        messages=HELLO,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert all(c.system_fingerprint is None and "system_fingerprint" not in c.model_fields_set for c in chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    # The usage chunk comes last, with no choices; every other chunk has one choice and no usage.
    *content_chunks, last = chunks
    assert last.choices == []
    check_usage(last.usage)
    assert all(len(c.choices) == 1 and c.usage is None for c in content_chunks)
    assert content_chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in content_chunks]
    assert finishes[-1] in ("stop", "length")
    assert all(f is None for f in finishes[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text.strip()


def test_chat_completion_streamed_without_usage(client: OpenAI):
    with client.chat.completions.create(
        model=CHAT_TASK, messages=HELLO, max_tokens=MAX_TOKENS, stream=True
    ) as stream:
        chunks = list(stream)
    assert chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()


def test_chat_completion_json_schema(client: OpenAI):
    reply = client.chat.completions.create(
        model=CHAT_TASK,
        messages=[{"role": "user", "content": "Name a city and its country, as JSON."}],
        max_tokens=32,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "place",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 10},
                        "country": {"type": "string", "maxLength": 10},
                    },
                    "required": ["city", "country"],
                    "additionalProperties": False,
                },
            },
        },
    )
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop", content
    place = json.loads(content)
    assert set(place) == {"city", "country"}
    assert all(isinstance(v, str) for v in place.values())


def test_chat_unknown_model_means_the_chat_task(client: OpenAI):
    """A model name that is no task (e.g. an OpenAI model) runs `server.chat_task`."""
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=MAX_TOKENS
    )
    assert raw.headers["x-triage-tier"] == CHAT_TIER
    reply = raw.parse()
    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.content.strip()


def test_chat_bad_response_format(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_TASK,
            messages=HELLO,
            max_tokens=MAX_TOKENS,
            response_format={"type": "yaml"},  # type: ignore[typeddict-item]
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "response_format"


def test_chat_wrong_key_over_tcp(chat_server: ChatServer):
    wrong = OpenAI(base_url=chat_server.base_url, api_key="wrong-" + chat_server.key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=CHAT_TASK, messages=HELLO, max_tokens=MAX_TOKENS)
    assert caught.value.status_code == 401
    wrong.close()


# ------------------------------------------------------------------- execute


def test_execute_chat_task(client: OpenAI):
    response = client.post(
        "/execute",
        cast_to=httpx.Response,
        body={
            "task": CHAT_TASK,
            "input": {"messages": HELLO, "max_tokens": MAX_TOKENS},
        },
    )
    assert response.status_code == 200
    assert response.headers["x-triage-tier"] == CHAT_TIER
    body = response.json()
    assert set(body) == {"answer", "trace"}
    assert isinstance(body["answer"]["text"], str) and body["answer"]["text"].strip()
    assert 0 < body["answer"]["usage"]["output_tokens"] <= MAX_TOKENS
    tiers = body["trace"]["tiers"]
    assert len(tiers) == 1
    assert tiers[0]["tier"] == CHAT_TIER
    assert tiers[0]["decision"] == "accepted"
    assert tiers[0]["model"] == "local-llm/smollm2"
    assert body["trace"]["cost_usd"] >= 0.0


def test_execute_moderation_task(client: OpenAI):
    response = client.post(
        "/execute",
        cast_to=httpx.Response,
        body={"task": "moderation", "input": "you are a disgusting worthless idiot"},
    )
    body = response.json()
    assert set(body) == {"answer", "trace"}
    assert body["trace"]["tiers"][0]["tier"] == "local"


def test_execute_unknown_task(client: OpenAI):
    with pytest.raises(openai.NotFoundError) as caught:
        client.post(
            "/execute", cast_to=httpx.Response, body={"task": "no-such-task", "input": "hi"}
        )
    assert caught.value.status_code == 404
    assert "no-such-task" in caught.value.message


# ---------------------------------------------------------- moderation, models


def test_config_moderation(client: OpenAI):
    raw = client.moderations.with_raw_response.create(
        model="omni-moderation-latest", input=["you are a disgusting worthless idiot", "thank you"]
    )
    assert raw.headers["x-triage-tier"] == "local"
    response = raw.parse()
    assert isinstance(response, ModerationCreateResponse)
    insult, kind = response.results
    assert insult.flagged is True
    assert insult.categories.harassment is True
    assert kind.flagged is False


def test_config_models_list(client: OpenAI):
    ids = {m.id for m in client.models.list()}
    assert {CHAT_TASK, "moderation", "omni-moderation-latest"} <= ids


def test_config_models_retrieve(client: OpenAI):
    """`client.models.retrieve` (GET /v1/models/{model}) for every listed id."""
    for listed in client.models.list():
        model = client.models.retrieve(listed.id)
        assert model.id == listed.id and model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
