"""The offline model: deterministic answers, tool calls for obvious asks, failure injection."""

from __future__ import annotations

import time

import pytest

from shared.prompts import extract_search_query, room_files_line
from shared.providers import (
    OfflineProvider,
    ProviderPermanentError,
    ProviderTransientError,
    build_provider,
    count_message_tokens,
    count_tokens,
    count_tool_schema_tokens,
)
from shared.settings import Settings

MODEL = "offline-small"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the room's files and earlier turns.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "file_read",
            "description": "Read a slice of an uploaded file.",
            "parameters": {
                "type": "object",
                "properties": {
                    "file_id": {"type": "string"},
                    "filename": {"type": "string"},
                    "offset": {"type": "integer"},
                    "max_chars": {"type": "integer"},
                },
            },
        },
    },
]
ROOM_SYSTEM = {
    "role": "system",
    "content": "You are a helpful assistant.\n"
    + room_files_line([("report.pdf", "file-1"), ("a.txt", "file-2"), ("data.txt", "file-3")]),
}


@pytest.fixture
def offline() -> OfflineProvider:
    return OfflineProvider()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_settings_with_offline_build_the_offline_provider():
    provider = build_provider(Settings(database_url="sqlite://"))

    assert provider.name == "offline"
    assert provider.supports_tools is True


def test_the_same_conversation_gets_the_same_answer(offline):
    messages = [{"role": "system", "content": "Be brief."}, user("What is a ledger?")]

    first = offline.complete(messages, model=MODEL, max_output_tokens=200)
    second = OfflineProvider().complete(messages, model=MODEL, max_output_tokens=200)

    assert first == second
    assert first.content and "What is a ledger?" in first.content
    assert first.finish_reason == "stop"
    assert first.model == MODEL
    assert first.tool_calls == []


def test_different_questions_get_different_answers(offline):
    first = offline.complete([user("How do credit wallets work?")], model=MODEL, max_output_tokens=300)
    second = offline.complete([user("Explain idempotency keys.")], model=MODEL, max_output_tokens=300)

    assert first.content != second.content


def test_token_counts_are_realistic_and_grow_with_the_input(offline):
    short = offline.complete([user("Hi there")], model=MODEL, max_output_tokens=500)
    long_text = "Please explain how the billing ledger keeps balances consistent. " * 20
    long = offline.complete([user(long_text)], model=MODEL, max_output_tokens=500)

    assert short.input_tokens == count_message_tokens([user("Hi there")])
    assert long.input_tokens > short.input_tokens + 250
    assert short.output_tokens == count_tokens(short.content)
    assert 10 < short.output_tokens < 500
    assert long.output_tokens > short.output_tokens


def test_offering_tools_adds_their_schema_to_the_input_tokens(offline):
    messages = [user("Tell me about Tollgate.")]

    without = offline.complete(messages, model=MODEL, max_output_tokens=200)
    with_tools = offline.complete(messages, model=MODEL, max_output_tokens=200, tools=TOOLS)

    assert with_tools.input_tokens == without.input_tokens + count_tool_schema_tokens(TOOLS)
    assert with_tools.tool_calls == []  # nothing obvious was asked


def test_a_reply_longer_than_max_output_tokens_is_cut_with_finish_reason_length(offline):
    messages = [user("Describe the whole system in detail, every part of it. " * 10)]

    completion = offline.complete(messages, model=MODEL, max_output_tokens=12)

    assert completion.finish_reason == "length"
    assert completion.output_tokens <= 12
    assert completion.content and completion.content.startswith("You asked:")


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("Please search for quarterly revenue.", "quarterly revenue"),
        ("SEARCH: invoice 2024-03", "invoice 2024-03"),
        ('search for "holiday policy" and summarise it', "holiday policy"),
    ],
)
def test_search_for_x_becomes_a_search_tool_call(offline, text, query):
    completion = offline.complete([ROOM_SYSTEM, user(text)], model=MODEL, max_output_tokens=200, tools=TOOLS)

    assert completion.content is None
    assert completion.finish_reason == "tool_calls"
    assert [(call.name, call.arguments) for call in completion.tool_calls] == [("search", {"query": query})]
    call = completion.tool_calls[0]
    assert call.id.startswith("call_")
    assert call.parse_error is None
    assert completion.output_tokens == count_tokens(call.name + call.raw_arguments)


def test_naming_a_room_file_becomes_a_file_read_call_by_id(offline):
    completion = offline.complete(
        [ROOM_SYSTEM, user("What does data.txt say about churn?")],
        model=MODEL,
        max_output_tokens=200,
        tools=TOOLS,
    )

    # "a.txt" is part of "data.txt", not named on its own.
    assert [(call.name, call.arguments) for call in completion.tool_calls] == [
        ("file_read", {"file_id": "file-3"})
    ]


def test_a_search_and_a_file_name_in_one_message_give_both_calls_with_distinct_ids(offline):
    messages = [ROOM_SYSTEM, user("Search for margins, and open REPORT.PDF too.")]

    completion = offline.complete(messages, model=MODEL, max_output_tokens=200, tools=TOOLS)
    again = offline.complete(messages, model=MODEL, max_output_tokens=200, tools=TOOLS)

    assert [call.name for call in completion.tool_calls] == ["search", "file_read"]
    assert completion.tool_calls[0].arguments == {"query": "margins, and open REPORT.PDF too"}
    assert completion.tool_calls[1].arguments == {"file_id": "file-1"}
    assert len({call.id for call in completion.tool_calls}) == 2
    assert [call.id for call in again.tool_calls] == [call.id for call in completion.tool_calls]


def test_no_tool_calls_when_tools_are_not_offered(offline):
    completion = offline.complete(
        [ROOM_SYSTEM, user("search for revenue")], model=MODEL, max_output_tokens=200
    )

    assert completion.tool_calls == []
    assert completion.content


def test_only_offered_tools_are_called(offline):
    only_search = [TOOLS[0]]

    completion = offline.complete(
        [ROOM_SYSTEM, user("read report.pdf")], model=MODEL, max_output_tokens=200, tools=only_search
    )

    assert completion.tool_calls == []


def test_after_tool_results_the_reply_quotes_them(offline):
    messages = [ROOM_SYSTEM, user("search for revenue")]
    first = offline.complete(messages, model=MODEL, max_output_tokens=200, tools=TOOLS)
    messages += [
        first.assistant_message(),
        {
            "role": "tool",
            "tool_call_id": first.tool_calls[0].id,
            "content": "Q3 revenue grew 12% to 4.1M, driven by the enterprise plan.",
        },
    ]

    answer = offline.complete(messages, model=MODEL, max_output_tokens=200, tools=TOOLS)

    assert answer.tool_calls == []
    assert answer.finish_reason == "stop"
    assert "search" in answer.content
    assert "Q3 revenue grew 12% to 4.1M" in answer.content
    assert answer.input_tokens > first.input_tokens


def test_a_new_user_message_after_earlier_tool_results_may_call_tools_again(offline):
    messages = [
        ROOM_SYSTEM,
        user("search for revenue"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"query":"x"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "old result"},
        {"role": "assistant", "content": "Revenue grew."},
        user("now search for costs"),
    ]

    completion = offline.complete(messages, model=MODEL, max_output_tokens=200, tools=TOOLS)

    assert [call.arguments for call in completion.tool_calls] == [{"query": "costs"}]


def test_a_summary_request_gets_a_short_extractive_summary(offline):
    messages = [
        {"role": "system", "content": "Summarize the conversation so far in a few sentences."},
        user(
            "user: Our refund window is 30 days. It applies to annual plans.\n"
            "assistant: Noted, refunds within 30 days. Anything else?"
        ),
    ]

    completion = offline.complete(messages, model=MODEL, max_output_tokens=100)

    assert completion.content.startswith("Summary:")
    assert "Our refund window is 30 days." in completion.content
    assert "It applies to annual plans" not in completion.content
    assert completion.output_tokens == count_tokens(completion.content)
    assert completion == offline.complete(messages, model=MODEL, max_output_tokens=100)


def test_a_rolling_summary_carries_earlier_points_forward_and_keeps_the_newest_when_short(offline):
    messages = [
        {"role": "system", "content": "Summarize the conversation so far."},
        user(
            "Summary so far:\nSummary: user: Budget is 10k. / assistant: Noted.\n\n"
            "New turns:\nuser: Deadline is May. Firm.\nassistant: Understood."
        ),
    ]

    full = offline.complete(messages, model=MODEL, max_output_tokens=200).content
    short = offline.complete(messages, model=MODEL, max_output_tokens=16).content

    assert full == (
        "Summary: user: Budget is 10k. / assistant: Noted. / user: Deadline is May. / assistant: Understood."
    )
    assert short == "Summary: user: Deadline is May. / assistant: Understood."


def test_fail_marker_is_a_permanent_provider_error(offline):
    with pytest.raises(ProviderPermanentError) as caught:
        offline.complete([user("hello [[offline:fail]]")], model=MODEL, max_output_tokens=50)

    assert caught.value.code == "provider_rejected"
    assert caught.value.transient is False


def test_transient_marker_is_a_transient_provider_error(offline):
    with pytest.raises(ProviderTransientError) as caught:
        offline.complete([user("hello [[offline:transient]]")], model=MODEL, max_output_tokens=50)

    assert caught.value.code == "provider_unavailable"
    assert caught.value.transient is True


def test_markers_only_count_in_the_last_user_message(offline):
    messages = [user("[[offline:fail]]"), {"role": "assistant", "content": "..."}, user("and now?")]

    assert offline.complete(messages, model=MODEL, max_output_tokens=50).content


def test_sleep_marker_delays_the_answer(offline):
    started = time.monotonic()
    completion = offline.complete(
        [user("slow please [[offline:sleep=0.3]]")], model=MODEL, max_output_tokens=50
    )

    assert time.monotonic() - started >= 0.3
    assert "[[offline" not in completion.content


def test_sleeping_past_the_call_timeout_is_a_provider_timeout(offline):
    started = time.monotonic()
    with pytest.raises(ProviderTransientError) as caught:
        offline.complete([user("[[offline:sleep=20]]")], model=MODEL, max_output_tokens=50, timeout=0.2)

    assert caught.value.code == "provider_timeout"
    assert time.monotonic() - started < 2


def test_fail_summary_marker_fails_only_summary_requests(offline):
    transcript = user("user: remember this [[offline:fail-summary]]")
    summary_request = [{"role": "system", "content": "Summarize the conversation."}, transcript]

    with pytest.raises(ProviderTransientError):
        offline.complete(summary_request, model=MODEL, max_output_tokens=100)
    assert offline.complete([transcript], model=MODEL, max_output_tokens=100).content


def test_turn_markers_quoted_in_a_transcript_do_not_fail_its_summary(offline):
    summary_request = [
        {"role": "system", "content": "Summarize the conversation."},
        user("user: try this [[offline:fail]] [[offline:transient]]\nassistant: ok"),
    ]

    assert offline.complete(summary_request, model=MODEL, max_output_tokens=100).content.startswith(
        "Summary:"
    )


def test_max_output_tokens_below_one_is_rejected(offline):
    with pytest.raises(ProviderPermanentError):
        offline.complete([user("hi")], model=MODEL, max_output_tokens=0)


def test_extract_search_query_is_the_heuristic_for_tool_less_providers():
    assert extract_search_query("could you search for tax rules in report.pdf?") == "tax rules in report.pdf"
    assert extract_search_query("research for tax rules") is None
    assert extract_search_query("search:   ") is None


def test_count_tokens_is_about_four_characters_per_token():
    assert count_tokens("") == 0
    assert count_tokens("a") == 1
    assert count_tokens("abcd" * 25) == 25
    with_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "search", "arguments": "x" * 40}}
        ],
    }
    assert (
        count_message_tokens([with_call])
        > count_message_tokens([{"role": "assistant", "content": None}]) + 10
    )
