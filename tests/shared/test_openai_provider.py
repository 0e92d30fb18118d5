"""The ``openai`` provider against a real local server speaking the protocol."""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.providers import (
    OpenAIProvider,
    ProviderError,
    ProviderPermanentError,
    ProviderTransientError,
    build_provider,
    count_message_tokens,
    count_tokens,
)
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# The fake server's `fake_openai` fixture.
pytest_plugins = ["tests.fakes.openai_server"]

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a ledger?"}]
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the room.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


@pytest.fixture
def provider(fake_openai):
    provider = OpenAIProvider(fake_openai.base_url, api_key="sk-test", timeout=5, backoff_base=0.01)
    yield provider
    provider.close()


def complete(provider, **kwargs):
    options = {"model": "gpt-test", "max_output_tokens": 64} | kwargs
    return provider.complete(MESSAGES, **options)


def test_settings_with_openai_build_a_provider_for_that_server(fake_openai):
    settings = Settings(
        database_url="sqlite://",
        model_provider="openai",
        openai_base_url=fake_openai.base_url + "/",  # a trailing slash is tolerated
        openai_api_key="sk-from-settings",
    )
    provider = build_provider(settings)

    completion = provider.complete(MESSAGES, model="gpt-test", max_output_tokens=10)

    assert provider.name == "openai" and provider.supports_tools is True
    assert completion.content == "Fake reply to: What is a ledger?"
    request = fake_openai.requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-from-settings"


def test_a_reply_carries_content_and_the_servers_usage(fake_openai, provider):
    fake_openai.reply(
        "A ledger is an append-only record.", usage={"prompt_tokens": 21, "completion_tokens": 8}
    )

    completion = complete(provider)

    assert completion.content == "A ledger is an append-only record."
    assert completion.tool_calls == []
    assert (completion.input_tokens, completion.output_tokens) == (21, 8)
    assert completion.finish_reason == "stop"
    assert completion.model == "gpt-test"


def test_the_request_sends_model_messages_max_tokens_tools_and_the_key(fake_openai, provider):
    complete(provider, max_output_tokens=77, tools=[SEARCH_TOOL])

    (request,) = fake_openai.requests
    assert request.body == {
        "model": "gpt-test",
        "messages": MESSAGES,
        "max_tokens": 77,
        "tools": [SEARCH_TOOL],
    }
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["content-type"] == "application/json"


def test_no_key_means_no_authorization_header_and_no_tools_means_no_tools_field(fake_openai):
    provider = OpenAIProvider(fake_openai.base_url)

    complete(provider)

    (request,) = fake_openai.requests
    assert "authorization" not in request.headers
    assert "tools" not in request.body


def test_missing_usage_is_estimated_with_the_offline_token_rule(fake_openai, provider):
    fake_openai.reply("Twelve chars", usage=None)

    completion = complete(provider)

    assert completion.input_tokens == count_message_tokens(MESSAGES)
    assert completion.output_tokens == count_tokens("Twelve chars")


def test_tool_calls_are_parsed_and_bad_arguments_are_reported_not_raised(fake_openai, provider):
    fake_openai.tool_calls(
        [
            {"id": "call_a", "name": "search", "arguments": {"query": "refunds"}},
            {"id": "call_b", "name": "file_read", "arguments": '{"file_id": "f1", '},
            {"id": "call_c", "name": "search", "arguments": "[1, 2]"},
        ],
        usage={"prompt_tokens": 30, "completion_tokens": 12},
    )

    completion = complete(provider, tools=[SEARCH_TOOL])

    assert completion.content is None
    assert completion.finish_reason == "tool_calls"
    good, unparsable, not_an_object = completion.tool_calls
    assert (good.id, good.name, good.arguments, good.parse_error) == (
        "call_a",
        "search",
        {"query": "refunds"},
        None,
    )
    assert (unparsable.name, unparsable.arguments, unparsable.raw_arguments) == (
        "file_read",
        {},
        '{"file_id": "f1", ',
    )
    assert unparsable.parse_error
    assert not_an_object.arguments == {} and not_an_object.parse_error
    assert completion.assistant_message()["tool_calls"][1]["function"]["arguments"] == '{"file_id": "f1", '


def test_a_500_is_retried_and_the_retry_succeeds(fake_openai, provider):
    fake_openai.status(500).reply("Second time lucky.")

    completion = complete(provider)

    assert completion.content == "Second time lucky."
    assert len(fake_openai.requests) == 2


def test_a_429_waits_for_retry_after_then_succeeds(fake_openai, provider):
    fake_openai.status(429, retry_after=1).reply("After the pause.")

    started = time.monotonic()
    completion = complete(provider)

    assert completion.content == "After the pause."
    assert time.monotonic() - started >= 0.95
    assert len(fake_openai.requests) == 2


def test_retry_after_is_capped(fake_openai):
    provider = OpenAIProvider(fake_openai.base_url, backoff_base=0.01, retry_after_cap=0.1)
    fake_openai.status(503, retry_after=3600).reply("ok")

    started = time.monotonic()
    assert complete(provider).content == "ok"
    assert time.monotonic() - started < 2


def test_a_server_failing_every_time_is_a_transient_error_after_three_attempts(fake_openai, provider):
    fake_openai.status(500, times=5)

    with pytest.raises(ProviderTransientError) as caught:
        complete(provider)

    assert caught.value.code == "provider_unavailable"
    assert caught.value.transient is True
    assert caught.value.status_code == 500
    assert len(fake_openai.requests) == 3


def test_persistent_rate_limiting_is_a_transient_rate_limited_error(fake_openai, provider):
    fake_openai.status(429, times=3)

    with pytest.raises(ProviderTransientError) as caught:
        complete(provider)

    assert caught.value.code == "provider_rate_limited"
    assert len(fake_openai.requests) == 3


def test_a_server_slower_than_the_call_timeout_is_a_provider_timeout(fake_openai, provider):
    fake_openai.hang(10, times=3)

    started = time.monotonic()
    with pytest.raises(ProviderTransientError) as caught:
        complete(provider, timeout=0.3)

    assert caught.value.code == "provider_timeout"
    assert len(fake_openai.requests) == 3
    assert time.monotonic() - started < 5


def test_one_slow_answer_is_retried(fake_openai, provider):
    fake_openai.hang(10).reply("Back in time.")

    assert complete(provider, timeout=0.3).content == "Back in time."
    assert len(fake_openai.requests) == 2


def test_an_unreachable_server_is_a_transient_unavailable_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = OpenAIProvider(f"http://127.0.0.1:{port}/v1", backoff_base=0.01)

    with pytest.raises(ProviderTransientError) as caught:
        complete(provider, timeout=1)

    assert caught.value.code == "provider_unavailable"


def test_a_body_that_is_not_json_is_a_permanent_bad_response(fake_openai, provider):
    fake_openai.malformed()

    with pytest.raises(ProviderPermanentError) as caught:
        complete(provider)

    assert caught.value.code == "provider_bad_response"
    assert caught.value.transient is False
    assert len(fake_openai.requests) == 1


def test_a_json_body_without_choices_is_a_permanent_bad_response(fake_openai, provider):
    fake_openai.json_body({"id": "x", "object": "chat.completion", "choices": []})

    with pytest.raises(ProviderPermanentError) as caught:
        complete(provider)

    assert caught.value.code == "provider_bad_response"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_fail_at_once_without_retrying(fake_openai, provider, status):
    fake_openai.status(status, body={"error": {"message": "Incorrect API key provided."}})

    with pytest.raises(ProviderPermanentError) as caught:
        complete(provider)

    assert caught.value.code == "provider_rejected"
    assert caught.value.status_code == status
    assert str(caught.value) == "The model provider rejected the request."
    assert len(fake_openai.requests) == 1


# What OpenAI answers to a wrong key: part of the key, echoed back.
MASKED_KEY_BODY = {
    "error": {
        "message": "Incorrect API key provided: sk-proj-Ab12************************wxYz. "
        "You can find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (401, "provider_rejected", "The model provider rejected the request."),
        (429, "provider_rate_limited", "The model provider is rate limiting requests."),
        (500, "provider_unavailable", "The model provider is unavailable."),
        (302, "provider_bad_response", "The model provider sent a response that is not a valid completion."),
    ],
)
def test_upstream_error_bodies_go_to_the_log_never_into_the_error_message(
    fake_openai, status, code, message, caplog
):
    provider = OpenAIProvider(fake_openai.base_url, api_key="sk-test", timeout=5, max_attempts=1)
    fake_openai.status(status, body=MASKED_KEY_BODY)

    with caplog.at_level("WARNING", logger="shared.providers.openai"):
        with pytest.raises(ProviderError) as caught:
            complete(provider)

    error = caught.value
    assert (error.code, error.message, str(error)) == (code, message, message)
    assert "sk-proj" not in repr(error.args) and "Incorrect API key" not in repr(error.args)
    # The message survives the trip through Celery's result serialisation unchanged.
    assert pickle.loads(pickle.dumps(error)).message == message
    (logged,) = [r for r in caplog.records if r.name == "shared.providers.openai"]
    assert f"HTTP {status}" in logged.getMessage() and "sk-proj-Ab12" in logged.getMessage()
    provider.close()


def test_a_long_upstream_error_body_is_logged_truncated(fake_openai, provider, caplog):
    fake_openai.status(400, body={"error": {"message": "x" * 20_000}})

    with caplog.at_level("WARNING", logger="shared.providers.openai"):
        with pytest.raises(ProviderPermanentError):
            complete(provider)

    (logged,) = [r for r in caplog.records if r.name == "shared.providers.openai"]
    assert "HTTP 400" in logged.getMessage()
    assert len(logged.getMessage()) < 700


def test_the_api_key_never_appears_in_an_error_message(fake_openai, provider):
    fake_openai.status(401)

    with pytest.raises(ProviderPermanentError) as caught:
        complete(provider)

    assert "sk-test" not in str(caught.value)


def test_another_process_can_call_the_fake_server_over_http(fake_openai):
    fake_openai.reply("Hello, other process.", usage={"prompt_tokens": 5, "completion_tokens": 4})
    script = (
        "import sys\n"
        "from shared.providers import OpenAIProvider\n"
        "provider = OpenAIProvider(sys.argv[1])\n"
        "messages = [{'role': 'user', 'content': 'hi'}]\n"
        "completion = provider.complete(messages, model='m', max_output_tokens=5)\n"
        "print(completion.content, completion.output_tokens)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script, fake_openai.base_url],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )

    assert result.stdout.strip() == "Hello, other process. 4", result.stderr
    (request,) = fake_openai.wait_for_requests(1)
    assert request.body["messages"] == [{"role": "user", "content": "hi"}]


def test_provider_errors_keep_code_and_message_through_pickling():
    error = ProviderTransientError("provider_rate_limited", "slow down", status_code=429, retry_after=2.0)

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is ProviderTransientError
    assert (copy.code, str(copy), copy.transient) == ("provider_rate_limited", "slow down", True)
    assert copy.status_code == 429
