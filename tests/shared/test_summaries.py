from types import SimpleNamespace

from shared.providers import OfflineProvider, ProviderTransientError
from shared.services import summaries


def turn(seq, content, reply="Sure. More text follows here."):
    return SimpleNamespace(seq=seq, content=content, reply=reply)


def test_the_extractive_fallback_is_deterministic_and_keeps_first_sentences():
    turns = [turn(1, "The budget is 40k. Please keep it."), turn(2, "Ship on Friday! Or Monday.")]
    text = summaries.extractive_summary("Earlier: we met.", turns)
    assert text == summaries.extractive_summary("Earlier: we met.", turns)
    assert text.splitlines() == [
        "Earlier: we met.",
        "[1] User: The budget is 40k.",
        "[1] Assistant: Sure.",
        "[2] User: Ship on Friday!",
        "[2] Assistant: Sure.",
    ]


def test_the_extractive_fallback_keeps_the_newest_text_within_its_limit():
    turns = [turn(n, f"Point {n} " + "x" * 300 + ".") for n in range(1, 40)]
    text = summaries.extractive_summary(None, turns)
    assert len(text) <= summaries.SUMMARY_MAX_CHARS
    assert "[39] User" in text and "[1] User" not in text


def test_a_model_summary_reports_its_tokens_and_coverage():
    result = summaries.summarize(
        OfflineProvider(),
        "offline-small",
        None,
        [turn(1, "Alpha fact."), turn(2, "Beta fact.")],
        allow_fallback=True,
    )
    assert result.used_fallback is False
    assert result.through_seq == 2
    assert result.text
    assert result.input_tokens > 0 and result.output_tokens > 0


def test_a_failing_generator_falls_back_or_raises_as_asked():
    turns = [turn(1, "Gamma. [[offline:fail-summary]]")]
    fallback = summaries.summarize(OfflineProvider(), "offline-small", None, turns, allow_fallback=True)
    assert fallback.used_fallback is True
    assert fallback.text == summaries.extractive_summary(None, turns)
    assert (fallback.input_tokens, fallback.output_tokens) == (0, 0)
    try:
        summaries.summarize(OfflineProvider(), "offline-small", None, turns, allow_fallback=False)
    except ProviderTransientError:
        pass
    else:
        raise AssertionError("expected the provider error")
