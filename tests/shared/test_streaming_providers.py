"""Streaming providers: ``complete(on_delta=…, should_stop=…)`` against the fake upstream
(SSE chunks, a final usage chunk) and the offline model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.providers import OpenAIProvider, ProviderPermanentError, count_message_tokens, count_tokens
from shared.providers.offline import OfflineProvider
from shared.providers.openai import CLIENT_SHARDS

pytest_plugins = ["tests.fakes.openai_server"]

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a ledger, really?"},
]
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}


@pytest.fixture
def provider(fake_openai):
    provider = OpenAIProvider(fake_openai.base_url, api_key="sk-test", timeout=5, backoff_base=0.01)
    yield provider
    provider.close()


def stream(provider, should_stop=None, **kwargs):
    pieces: list[str] = []
    options = {"model": "gpt-test", "max_output_tokens": 64} | kwargs
    completion = provider.complete(MESSAGES, on_delta=pieces.append, should_stop=should_stop, **options)
    return completion, pieces


def test_the_upstream_is_asked_to_stream_with_usage_and_the_pieces_make_the_answer(provider, fake_openai):
    fake_openai.reply(
        "A ledger is an append-only list of entries.", usage={"prompt_tokens": 21, "completion_tokens": 9}
    )
    completion, pieces = stream(provider)
    body = fake_openai.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (
        len(pieces) > 1
        and "".join(pieces) == completion.content == "A ledger is an append-only list of entries."
    )
    assert (completion.input_tokens, completion.output_tokens) == (21, 9)  # from the final usage chunk
    assert completion.usage_estimated is False and completion.finish_reason == "stop"


def test_tool_call_fragments_are_joined(provider, fake_openai):
    fake_openai.tool_calls([{"name": "search", "arguments": {"query": "holiday policy for contractors"}}])
    completion, pieces = stream(provider, tools=[SEARCH_TOOL])
    [call] = completion.tool_calls
    assert call.name == "search" and call.arguments == {"query": "holiday policy for contractors"}
    assert completion.finish_reason == "tool_calls" and pieces == []


def test_no_usage_chunk_means_an_estimate_marked_as_such(provider, fake_openai):
    fake_openai.reply("No usage here.", usage=None)
    completion, _ = stream(provider)
    assert completion.usage_estimated is True
    assert completion.input_tokens == count_message_tokens(MESSAGES)
    assert completion.output_tokens == count_tokens("No usage here.")


def test_a_stream_dropped_mid_answer_raises_with_the_estimated_usage(provider, fake_openai):
    fake_openai.drop_stream(after_chunks=2)
    pieces: list[str] = []
    with pytest.raises(ProviderPermanentError) as dropped:
        provider.complete(MESSAGES, model="gpt-test", max_output_tokens=64, on_delta=pieces.append)
    assert dropped.value.code == "provider_stream_interrupted"
    assert dropped.value.usage_estimated is True
    assert dropped.value.input_tokens == count_message_tokens(MESSAGES)
    assert dropped.value.output_tokens == count_tokens("".join(pieces)) > 0
    assert len(fake_openai.requests) == 1  # a stream that had started is never retried


def test_should_stop_closes_the_stream_and_bills_the_running_usage(provider, fake_openai):
    fake_openai.stream_running_usage = True
    fake_openai.stream_delay = 0.05
    asked = []
    completion, pieces = stream(provider, should_stop=lambda: asked.append(1) or len(asked) >= 3)
    assert completion.finish_reason == "cancelled" and completion.cancelled
    assert completion.content == "".join(pieces) and len(pieces) == 2
    assert completion.output_tokens == count_tokens(completion.content)  # the upstream's own count
    assert completion.usage_estimated is False


def test_the_offline_model_streams_in_pieces_and_stops_when_asked():
    offline = OfflineProvider(stream_delay=0)
    pieces: list[str] = []
    whole = offline.complete(MESSAGES, model="offline-small", max_output_tokens=200)
    streamed = offline.complete(
        MESSAGES, model="offline-small", max_output_tokens=200, on_delta=pieces.append
    )
    assert streamed == whole and "".join(pieces) == whole.content and len(pieces) > 3
    stopped = offline.complete(
        MESSAGES,
        model="offline-small",
        max_output_tokens=200,
        on_delta=lambda _: None,
        should_stop=lambda: len(pieces) > 0,
    )
    assert stopped.cancelled and stopped.content == "" and stopped.output_tokens == 0
    asked = []
    partial = offline.complete(
        MESSAGES,
        model="offline-small",
        max_output_tokens=200,
        on_delta=lambda _: None,
        should_stop=lambda: asked.append(1) or len(asked) > 2,
    )
    assert (
        partial.cancelled
        and whole.content.startswith(partial.content)
        and 0 < len(partial.content) < len(whole.content)
    )
    assert partial.output_tokens == count_tokens(partial.content)


def test_a_server_that_ignores_stream_and_answers_json_is_one_piece(provider, fake_openai):
    fake_openai.json_body(
        {
            "choices": [
                {"message": {"role": "assistant", "content": "Plain JSON."}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3},
        }
    )
    completion, pieces = stream(provider)
    assert pieces == ["Plain JSON."] and completion.content == "Plain JSON."
    assert (completion.input_tokens, completion.output_tokens) == (7, 3)


def test_a_finished_stream_leaves_its_connection_for_the_next_call(provider, fake_openai):
    """OpenAI streams over a keep-alive connection: the stream is read to its end after
    ``[DONE]``, so the connection goes back to the pool instead of being closed (a new TCP
    connection and DNS look-up for every turn)."""
    fake_openai.stream_keep_alive = True
    for _ in range(3):
        completion, pieces = stream(provider)
        assert "".join(pieces) == completion.content != ""
    assert len(fake_openai.requests) == 3
    assert fake_openai.connections == 1


def test_a_burst_of_calls_is_in_flight_at_once_and_keeps_its_connections(provider, fake_openai):
    """More calls than httpx's default pool (100 connections, 20 kept alive) at once: all are
    in flight together, and a second burst reuses the first's connections."""
    fake_openai.stream_keep_alive = True
    fake_openai.latency_by_model["gpt-slow"] = 0.5
    calls = 120

    def burst() -> None:
        with ThreadPoolExecutor(calls) as pool:
            answers = list(pool.map(lambda _: stream(provider, model="gpt-slow")[0], range(calls)))
        assert all(answer.content for answer in answers)

    burst()
    assert fake_openai.peak_in_flight == calls
    burst()
    assert fake_openai.connections == calls
    # Spread over the clients: no one pool manages them all (httpcore's pool work per request
    # grows with the square of its connections).
    pools = [client._transport._pool.connections for client in provider._clients]
    assert len(pools) == CLIENT_SHARDS
    assert max(len(pool) for pool in pools) == calls // CLIENT_SHARDS
