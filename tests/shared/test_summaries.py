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
    result = summaries.fold_turns(
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
    fallback = summaries.fold_turns(OfflineProvider(), "offline-small", None, turns, allow_fallback=True)
    assert fallback.used_fallback is True
    assert fallback.text == summaries.extractive_summary(None, turns)
    assert (fallback.input_tokens, fallback.output_tokens) == (0, 0)
    try:
        summaries.fold_turns(OfflineProvider(), "offline-small", None, turns, allow_fallback=False)
    except ProviderTransientError:
        pass
    else:
        raise AssertionError("expected the provider error")


def test_turns_leave_the_window_in_batches_and_stay_verbatim_until_a_batch_is_complete(db, user):
    """One summary call per SUMMARY_BATCH_TURNS turns: the background refresh folds a batch
    once one has left the window; a turn's own context keeps the uncovered turns verbatim
    until two batches have (the refresh fell behind), then folds all of them itself; once
    summarised, the covered turns leave the context."""
    from shared.models import ChatSession, Room
    from tests.factories import make_completed_turn

    room = Room(user_id=user.id, name="batches")
    db.add(room)
    db.flush()
    chat = ChatSession(room_id=room.id, user_id=user.id)
    db.add(chat)
    db.commit()
    window, batch = summaries.WINDOW_TURNS, summaries.SUMMARY_BATCH_TURNS
    in_turn = summaries.FOLD_IN_TURN_TURNS
    assert in_turn == 2 * batch
    for seq in range(1, window + 3 * batch + 1):
        make_completed_turn(db, chat, seq, f"Question {seq}.", "Answer.")

    def seqs(before_seq, fold_at=in_turn):
        recent, missing = summaries.window(db, chat, before_seq, fold_at=fold_at)
        return [t.seq for t in recent], [t.seq for t in missing]

    assert seqs(window + 1) == (list(range(1, window + 1)), [])
    # Up to batch - 1 turns past the window stay verbatim, and the next turn is due a refresh.
    last_verbatim = window + batch
    assert seqs(last_verbatim, batch) == (list(range(1, last_verbatim)), [])
    assert summaries.due_after(summaries.window(db, chat, last_verbatim)[0])
    assert not summaries.due_after(summaries.window(db, chat, last_verbatim - 1)[0])
    # A full batch has left: the refresh folds it, the turn itself keeps it verbatim.
    assert seqs(last_verbatim + 1, batch) == (
        list(range(batch + 1, last_verbatim + 1)),
        list(range(1, batch + 1)),
    )
    assert seqs(last_verbatim + 1) == (list(range(1, last_verbatim + 1)), [])
    # Verbatim up to two batches less one; the turn after folds all of them itself.
    last_in_turn_verbatim = window + in_turn
    assert seqs(last_in_turn_verbatim) == (list(range(1, last_in_turn_verbatim)), [])
    # One refresh per batch: the turns after the one that completed it send none.
    assert not summaries.due_after(summaries.window(db, chat, last_verbatim + 1)[0])
    assert not summaries.due_after(summaries.window(db, chat, last_in_turn_verbatim)[0])
    assert seqs(last_in_turn_verbatim + 1) == (
        list(range(in_turn + 1, last_in_turn_verbatim + 1)),
        list(range(1, in_turn + 1)),
    )
    # Summarised through the first batch: those turns are gone from the context.
    chat.summary, chat.summary_through_seq = "Earlier.", batch
    db.commit()
    assert seqs(last_verbatim + 1) == (list(range(batch + 1, last_verbatim + 1)), [])
    assert seqs(last_verbatim + 1, batch) == (list(range(batch + 1, last_verbatim + 1)), [])
    # A lagging summary: every uncovered turn before the window is missing, not only a batch,
    # past what one bounded read holds.
    chat.summary_through_seq = 0
    db.commit()
    end = window + 3 * batch + 1
    assert seqs(end) == (list(range(end - window, end)), list(range(1, end - window)))
    assert seqs(end, batch) == (list(range(end - window, end)), list(range(1, end - window)))
