"""End-to-end: the official OpenAI Python SDK, unmodified, against `triage serve`.

Every test that talks to the server runs twice: over TCP with a bearer key, and over the
unix socket (no key needed; the SDK still sends its placeholder key). Run through
scripts/test-sdk, which starts the server and sets:

  TRIAGE_SDK_BASE_URL        http://127.0.0.1:PORT/v1
  TRIAGE_SDK_KEY             the bearer key the server accepts on TCP
  TRIAGE_SDK_SOCKET          the unix socket path
  TRIAGE_SDK_CLIP            a short English speech clip ("Go forward 10 meters.")
  TRIAGE_SDK_FLAG_THRESHOLD  the server's --flag-threshold
"""

import re
import wave

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Model, Moderation, ModerationCreateResponse
from openai.types.audio import Transcription, TranscriptionSegment, TranscriptionVerbose
from servers import Server

# Clear-cut for the default toxicity specialist (offensive score ~0.95 and ~0.03).
INSULT = "you are a disgusting worthless idiot"
KIND = "thank you, have a lovely day"

# OpenAI's moderation categories, as the SDK's types name them on the wire.
CATEGORIES = {
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
}


@pytest.fixture(scope="module", params=["tcp", "unix"])
def client(request, server: Server):
    if request.param == "tcp":
        c = OpenAI(base_url=server.base_url, api_key=server.key)
    else:
        c = OpenAI(
            base_url="http://triage/v1",
            api_key="unused",
            http_client=httpx.Client(transport=httpx.HTTPTransport(uds=server.socket)),
        )
    yield c
    c.close()


def clip_seconds(path: str) -> float:
    with wave.open(path, "rb") as w:
        return w.getnframes() / w.getframerate()


def check_consistent(result: Moderation, threshold: float) -> None:
    """The categories, scores and `flagged` of one result agree with each other."""
    assert isinstance(result, Moderation)
    categories = result.categories.model_dump(by_alias=True)
    scores = result.category_scores.model_dump(by_alias=True)
    assert set(categories) == CATEGORIES
    assert set(scores) == CATEGORIES
    for name in CATEGORIES:
        assert isinstance(scores[name], float), name
        assert 0.0 <= scores[name] <= 1.0, name
        assert categories[name] is (scores[name] >= threshold), name
    assert result.flagged is any(categories.values())
    assert result.categories.harassment is (result.category_scores.harassment >= threshold)


# ---------------------------------------------------------------- moderation


@pytest.mark.parametrize("model", ["omni-moderation-latest", "text-moderation-latest"])
def test_moderation_single_input(client: OpenAI, server: Server, model: str):
    response = client.moderations.create(model=model, input=INSULT)
    assert isinstance(response, ModerationCreateResponse)
    assert response.model == model
    assert response.id
    assert len(response.results) == 1
    result = response.results[0]
    check_consistent(result, server.flag_threshold)
    assert result.flagged is True
    assert result.categories.harassment is True
    assert result.category_scores.harassment > 0.8


def test_moderation_list_input(client: OpenAI, server: Server):
    response = client.moderations.create(model="omni-moderation-latest", input=[INSULT, KIND])
    assert isinstance(response, ModerationCreateResponse)
    assert len(response.results) == 2
    insult, kind = response.results
    for result in response.results:
        check_consistent(result, server.flag_threshold)
    assert insult.flagged is True
    assert insult.categories.harassment is True
    assert insult.category_scores.harassment > 0.8
    assert kind.flagged is False
    assert kind.categories.harassment is False
    assert kind.category_scores.harassment < 0.2


def test_moderation_response_validates_against_sdk_schema(client: OpenAI):
    raw = client.moderations.with_raw_response.create(model="omni-moderation-latest", input=KIND)
    parsed = ModerationCreateResponse.model_validate(raw.http_response.json())
    assert parsed.results[0].category_applied_input_types.harassment == ["text"]
    assert raw.headers["x-request-id"]


def test_moderation_raw_response_headers(client: OpenAI):
    raw = client.moderations.with_raw_response.create(model="omni-moderation-latest", input=KIND)
    assert raw.status_code == 200
    assert raw.headers["x-triage-tier"] == "local:toxicity"
    assert float(raw.headers["x-triage-cost-usd"]) >= 0.0
    parsed = raw.parse()
    assert isinstance(parsed, ModerationCreateResponse)
    assert parsed.results[0].flagged is False


# ------------------------------------------------------------- transcription


def test_transcription_json(client: OpenAI, server: Server):
    with open(server.clip, "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert isinstance(result, Transcription)
    assert "forward" in result.text.lower()


def test_transcription_text(client: OpenAI, server: Server):
    with open(server.clip, "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="text"
        )
    assert isinstance(result, str)
    assert "forward" in result.lower()


TIMING = {
    "srt": re.compile(r"^\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d$", re.M),
    "vtt": re.compile(r"^\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d$", re.M),
}


@pytest.mark.parametrize("response_format", ["srt", "vtt"])
def test_transcription_subtitles(client: OpenAI, server: Server, response_format: str):
    with open(server.clip, "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format=response_format
        )
    assert isinstance(result, str)
    assert "forward" in result.lower()
    assert TIMING[response_format].search(result), result
    if response_format == "srt":
        assert result.startswith("1\n")
    else:
        assert result.startswith("WEBVTT")


def test_transcription_verbose_json(client: OpenAI, server: Server):
    with open(server.clip, "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json"
        )
    assert isinstance(result, TranscriptionVerbose)
    assert "forward" in result.text.lower()
    assert result.language == "en"
    assert isinstance(result.duration, float)
    assert result.duration == pytest.approx(clip_seconds(server.clip), abs=0.1)
    assert result.segments
    for segment in result.segments:
        assert isinstance(segment, TranscriptionSegment)
        assert 0.0 <= segment.start <= segment.end <= result.duration + 0.5
        assert isinstance(segment.avg_logprob, float)
        assert 0.0 <= segment.no_speech_prob <= 1.0
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    assert "forward" in " ".join(s.text for s in result.segments).lower()
    # What the SDK parsed also validates strictly against its type: no required field is missing.
    TranscriptionVerbose.model_validate(result.model_dump(mode="json"))


# -------------------------------------------------------------------- models


def test_models_list(client: OpenAI):
    models = list(client.models.list())
    assert all(isinstance(m, Model) for m in models)
    ids = {m.id for m in models}
    assert {"whisper-1", "omni-moderation-latest", "text-moderation-latest"} <= ids


def test_models_retrieve(client: OpenAI):
    whisper = client.models.retrieve("whisper-1")
    assert isinstance(whisper, Model) and whisper.id == "whisper-1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# -------------------------------------------------------------------- errors


def test_wrong_key_over_tcp(server: Server):
    wrong = OpenAI(base_url=server.base_url, api_key="wrong-" + server.key)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.moderations.create(model="omni-moderation-latest", input=KIND)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    wrong.close()


def test_unknown_moderation_model(client: OpenAI):
    with pytest.raises(openai.NotFoundError) as caught:
        client.moderations.create(model="no-such-moderation-model", input=KIND)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert "no-such-moderation-model" in caught.value.message


def test_unknown_transcription_model(client: OpenAI, server: Server):
    with open(server.clip, "rb") as f, pytest.raises(openai.NotFoundError) as caught:
        client.audio.transcriptions.create(model="no-such-whisper", file=f)
    assert caught.value.code == "model_not_found"


def test_chat_completions_need_a_config(client: OpenAI):
    """Without `--config` there is no chat task: 404. test_chat_sdk.py covers chat with one."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    assert caught.value.status_code == 404
