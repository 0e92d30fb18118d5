"""Money that adds up (issue 11), on Postgres: holds that bound what a turn can spend, no
expiry under a running turn, every turn ends, partial usage billed.

The runner is called in-process (no Celery) so each step of a race can be placed exactly;
the worker path is covered by test_enforced_turns_pg.py and test_faults_pg.py.
"""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from shared.db import new_id
from shared.errors import InsufficientBalance
from shared.models import ChatSession, Hold, LedgerEntry, Room, Turn, Wallet
from shared.providers import OfflineProvider, OpenAIProvider
from shared.services import billing, files, ledger_check, pricing, turn_runner, turns
from shared.tools.registry import build_registry
from tests.integration.test_hot_path_pg import counting

pytest_plugins = ["tests.fakes.openai_server"]

D = Decimal


class NamedBytes(io.BytesIO):
    def __init__(self, data: bytes, filename: str):
        super().__init__(data)
        self.filename = filename


@pytest.fixture
def runtime(pg_app):
    return pg_app.extensions["tollgate"]


@pytest.fixture
def enforced(pg_client, pg_admin):
    response = pg_client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
    )
    assert response.status_code == 200


@pytest.fixture
def chat(pg_db, pg_user) -> ChatSession:
    room = Room(user_id=pg_user.id, name="money")
    pg_db.add(room)
    pg_db.commit()
    chat = ChatSession(room_id=room.id, user_id=pg_user.id)
    pg_db.add(chat)
    pg_db.commit()
    return chat


def grant(pg_db, admin, user, amount: str) -> None:
    billing.grant_credit(
        pg_db, actor_id=admin.id, user_id=user.id, amount=D(amount), reason="test", idempotency_key=None
    )


def submit(runtime, pg_db, user, chat, content: str, **extra) -> Turn:
    turn, created = turns.submit(runtime, pg_db, user.user, chat.id, {"content": content, **extra}, None)
    assert created
    return turn


def run(runtime, turn_id: str, provider=None) -> str:
    return turn_runner.run_turn(
        runtime,
        turn_id,
        provider=provider or OfflineProvider(),
        tools=build_registry(),
        takeover=False,
        final_attempt=True,
    )


def fresh(pg_db, model, **where):
    pg_db.expire_all()
    return pg_db.scalar(select(model).filter_by(**where))


def charged_for(pg_db, turn_id: str) -> Decimal:
    total = pg_db.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.turn_id == turn_id, LedgerEntry.kind.in_(("capture", "debit"))
        )
    )
    return -D(total)


def assert_books_clean(pg_db) -> None:
    pg_db.expire_all()
    assert ledger_check.find_mismatches(pg_db) == []
    assert ledger_check.find_violations(pg_db) == []


def test_a_long_context_turn_is_charged_its_real_usage(enforced, runtime, pg_db, pg_admin, pg_user, chat):
    """Seven long turns, then "hi" with max_output_tokens=1: the turn sends the summary call
    and six 30k-character turns (~50k input tokens). It used to be charged a flat
    estimate (0.002051); now its hold covers the context and the charge is its cost."""
    grant(pg_db, pg_admin, pg_user, "10")
    for n in range(7):
        long_turn = submit(runtime, pg_db, pg_user, chat, f"Part {n}. " + "lorem ipsum dolor " * 1700)
        assert run(runtime, long_turn.id) == "completed"
    hi = submit(runtime, pg_db, pg_user, chat, "hi", max_output_tokens=1)
    hold = fresh(pg_db, Hold, turn_id=hi.id)
    assert run(runtime, hi.id) == "completed"

    done = fresh(pg_db, Turn, id=hi.id)
    price = pricing.price_in_force(pg_db, "offline-small")
    assert done.input_tokens > 45_000  # the summary call plus six long turns of context
    assert done.summary_used_fallback is False  # the hold paid for the summary call too
    assert done.cost == pricing.cost_of(price, done.input_tokens, done.output_tokens)
    assert done.cost > D("0.045")
    assert charged_for(pg_db, hi.id) == done.cost <= hold.amount
    assert_books_clean(pg_db)


def admit_with_nothing_left(runtime, pg_db, pg_admin, pg_user, chat) -> tuple[Turn, Hold]:
    """Turn A admitted, then the wallet trimmed so its available credit is exactly zero:
    A's hold is all the credit there is."""
    grant(pg_db, pg_admin, pg_user, "0.01")
    a = submit(runtime, pg_db, pg_user, chat, "first question")
    hold = fresh(pg_db, Hold, turn_id=a.id)
    billing.adjust_credit(
        pg_db,
        actor_id=pg_admin.id,
        user_id=pg_user.id,
        amount=-(D("0.01") - hold.amount),
        reason="leave exactly A's hold",
        idempotency_key=None,
    )
    return a, hold


def test_a_hold_does_not_expire_under_a_running_turn(enforced, runtime, pg_db, pg_admin, pg_user, chat):
    """Balance just covers turn A. A is running when the expiry job passes: its hold stays,
    so turn B is refused and A settles within its hold."""
    a, hold = admit_with_nothing_left(runtime, pg_db, pg_admin, pg_user, chat)
    claimed = turn_runner.claim(runtime, a.id, takeover=False)
    assert claimed is not None

    # The hold's expires_at has passed; A's lease is live (its worker renews it): kept.
    pg_db.execute(update(Hold).where(Hold.turn_id == a.id).values(expires_at=datetime.now(UTC)))
    pg_db.commit()
    assert billing.expire_stale_holds(pg_db) == 0
    with pytest.raises(InsufficientBalance):
        submit(runtime, pg_db, pg_user, chat, "second question")

    result = turn_runner.execute(
        runtime, claimed.turn, OfflineProvider(), build_registry(), hold_amount=claimed.hold_amount
    )
    assert turn_runner.complete(runtime, a.id, result)
    wallet = fresh(pg_db, Wallet, user_id=pg_user.id)
    assert wallet.balance >= 0 and wallet.held == 0
    assert fresh(pg_db, Hold, turn_id=a.id).status == "captured"
    assert_books_clean(pg_db)


def test_a_turn_whose_hold_expired_never_takes_an_enforced_wallet_below_zero(
    enforced, runtime, pg_db, pg_admin, pg_user, chat
):
    """The reproduction: A admitted and running, its hold expired (its worker was judged
    dead), B admitted on the freed credit, then A completes after all. It used to write an
    uncapped debit (balance -0.049410); now it is charged only what is still available."""
    a, hold = admit_with_nothing_left(runtime, pg_db, pg_admin, pg_user, chat)
    claimed = turn_runner.claim(runtime, a.id, takeover=False)
    result = turn_runner.execute(
        runtime, claimed.turn, OfflineProvider(), build_registry(), hold_amount=claimed.hold_amount
    )

    # A's worker stopped renewing: its lease lapsed, and so did its hold.
    pg_db.execute(update(Turn).where(Turn.id == a.id).values(lease_expires_at=datetime.now(UTC)))
    pg_db.execute(update(Hold).where(Hold.turn_id == a.id).values(expires_at=datetime.now(UTC)))
    pg_db.commit()
    assert billing.expire_stale_holds(pg_db) == 1
    b = submit(runtime, pg_db, pg_user, chat, "second question")
    assert turn_runner.complete(runtime, a.id, result)
    assert run(runtime, b.id) == "completed"

    wallet = fresh(pg_db, Wallet, user_id=pg_user.id)
    assert wallet.balance >= 0 and wallet.held == 0
    entries = pg_db.scalars(select(LedgerEntry).where(LedgerEntry.user_id == pg_user.id)).all()
    assert min(entry.balance_after for entry in entries) >= 0
    assert charged_for(pg_db, a.id) <= hold.amount
    assert_books_clean(pg_db)


def test_deeply_nested_tool_arguments_end_the_turn_failed_and_billed(
    enforced, runtime, pg_db, pg_admin, pg_user, chat, fake_openai
):
    """Round 1: a search (usage reported). Round 2: arguments nested 100,000 deep, which
    json.loads cannot parse (RecursionError). The turn used to stay ``running`` and be
    re-run five times for free; now it ends ``failed`` with ``bad_model_output``, billed
    for both rounds (the second answer arrived, with its usage), the rest released."""
    grant(pg_db, pg_admin, pg_user, "10")
    pricing.set_price(pg_db, pg_admin.id, "gpt-test", D("1.000000"), D("2.000000"))
    fake_openai.tool_calls(
        [{"name": "search", "arguments": {"query": "budget"}}],
        usage={"prompt_tokens": 300, "completion_tokens": 20},
    )
    fake_openai.tool_calls(
        [{"name": "search", "arguments": "[" * 100_000 + "]" * 100_000}],
        usage={"prompt_tokens": 400, "completion_tokens": 50},
    )
    turn = submit(runtime, pg_db, pg_user, chat, "find the budget", model="gpt-test")
    provider = OpenAIProvider(base_url=fake_openai.base_url, api_key="k", backoff_base=0)
    assert run(runtime, turn.id, provider) == "failed"

    done = fresh(pg_db, Turn, id=turn.id)
    assert done.status == "failed" and done.error_code == "bad_model_output"
    assert (done.input_tokens, done.output_tokens) == (700, 70)
    price = pricing.price_in_force(pg_db, "gpt-test")
    assert done.cost == pricing.cost_of(price, done.input_tokens, done.output_tokens) > 0
    assert charged_for(pg_db, turn.id) == done.cost
    assert fresh(pg_db, Hold, turn_id=turn.id).status == "captured"
    wallet = fresh(pg_db, Wallet, user_id=pg_user.id)
    assert wallet.held == 0 and wallet.balance == D("10") - done.cost
    assert_books_clean(pg_db)


def test_a_nul_in_a_model_reply_is_stored_without_it(runtime, pg_db, pg_admin, pg_user, chat, fake_openai):
    pricing.set_price(pg_db, pg_admin.id, "gpt-test", D("0.001000"), D("0.002000"))
    fake_openai.reply("before\x00after \ud800x", usage={"prompt_tokens": 10, "completion_tokens": 3})
    turn = submit(runtime, pg_db, pg_user, chat, "say something", model="gpt-test")
    provider = OpenAIProvider(base_url=fake_openai.base_url, api_key="k", backoff_base=0)
    assert run(runtime, turn.id, provider) == "completed"
    assert fresh(pg_db, Turn, id=turn.id).reply == "beforeafter \ufffdx"


def test_a_provider_failure_after_a_tool_round_bills_the_round_and_hides_the_upstream_text(
    enforced, runtime, pg_db, pg_admin, pg_user, chat, fake_openai
):
    grant(pg_db, pg_admin, pg_user, "10")
    pricing.set_price(pg_db, pg_admin.id, "gpt-test", D("1.000000"), D("2.000000"))
    fake_openai.tool_calls(
        [{"name": "search", "arguments": {"query": "budget"}}],
        usage={"prompt_tokens": 250, "completion_tokens": 10},
    )
    fake_openai.status(401, body={"error": {"message": "Incorrect API key provided: sk-abc***xyz"}})
    turn = submit(runtime, pg_db, pg_user, chat, "find the budget", model="gpt-test")
    provider = OpenAIProvider(base_url=fake_openai.base_url, api_key="k", backoff_base=0)
    assert run(runtime, turn.id, provider) == "failed"

    done = fresh(pg_db, Turn, id=turn.id)
    assert (done.input_tokens, done.output_tokens) == (250, 10)
    assert done.cost == D("0.270000")  # 250 × 1/1k + 10 × 2/1k
    assert "sk-" not in (done.error_message or "") and done.error_message
    assert fresh(pg_db, Wallet, user_id=pg_user.id).balance == D("9.73")
    assert_books_clean(pg_db)


def test_an_unenforced_failed_turn_is_billed_what_it_used(
    runtime, pg_db, pg_admin, pg_user, chat, fake_openai
):
    pricing.set_price(pg_db, pg_admin.id, "gpt-test", D("1.000000"), D("2.000000"))
    fake_openai.tool_calls(
        [{"name": "search", "arguments": {"query": "budget"}}],
        usage={"prompt_tokens": 100, "completion_tokens": 10},
    )
    fake_openai.status(400)
    turn = submit(runtime, pg_db, pg_user, chat, "find the budget", model="gpt-test")
    provider = OpenAIProvider(base_url=fake_openai.base_url, api_key="k", backoff_base=0)
    assert run(runtime, turn.id, provider) == "failed"
    assert fresh(pg_db, Turn, id=turn.id).cost == D("0.12")
    assert fresh(pg_db, Wallet, user_id=pg_user.id).balance == D("-0.12")
    assert_books_clean(pg_db)


def test_a_failed_turn_that_used_nothing_is_not_billed(enforced, runtime, pg_db, pg_admin, pg_user, chat):
    grant(pg_db, pg_admin, pg_user, "1")
    turn = submit(runtime, pg_db, pg_user, chat, "[[offline:fail]]")
    assert run(runtime, turn.id) == "failed"
    done = fresh(pg_db, Turn, id=turn.id)
    assert done.cost is None and done.error_code == "provider_rejected"
    assert fresh(pg_db, Hold, turn_id=turn.id).status == "released"
    assert fresh(pg_db, Wallet, user_id=pg_user.id).balance == D("1")
    assert_books_clean(pg_db)


def test_a_tool_round_past_the_hold_is_trimmed_to_fit_instead_of_overspending(
    enforced, runtime, pg_db, pg_admin, pg_user, chat, fake_openai
):
    """The model reads 20,000 characters of a file every round (about 5,000 tokens, more than
    the hold's allowance for tool results). The runner offers no further tool round once
    the answer after it would not be covered, and cuts the tool results so the answer fits:
    the charge stays within the hold."""
    grant(pg_db, pg_admin, pg_user, "10")
    pricing.set_price(pg_db, pg_admin.id, "gpt-test", D("1.000000"), D("2.000000"))
    uploaded = files.upload(
        pg_db, pg_user.id, chat.room_id, NamedBytes(("word " * 40_000).encode(), "big.txt"), max_bytes=1 << 20
    )
    assert files.ingest(pg_db, uploaded.id) == "ready"
    read = {"name": "file_read", "arguments": {"filename": "big.txt", "max_chars": 20_000}}
    fake_openai.tool_calls([read], times=4)
    turn = submit(runtime, pg_db, pg_user, chat, "read big.txt", model="gpt-test", max_output_tokens=50)
    hold = fresh(pg_db, Hold, turn_id=turn.id)
    provider = OpenAIProvider(base_url=fake_openai.base_url, api_key="k", backoff_base=0)
    assert run(runtime, turn.id, provider) == "completed"

    done = fresh(pg_db, Turn, id=turn.id)
    assert charged_for(pg_db, turn.id) == done.cost <= hold.amount
    sent = [r.body for r in fake_openai.requests]
    assert [bool(body.get("tools")) for body in sent] == [True, False]
    tool_results = [m["content"] for m in sent[1]["messages"] if m["role"] == "tool"]
    assert tool_results and all(text.endswith("[cut to fit the turn's budget]") for text in tool_results)
    assert_books_clean(pg_db)


def test_a_queued_turn_is_claimed_in_one_statement_with_its_hold_amount(
    enforced, runtime, pg_db, pg_admin, pg_user, chat
):
    """The usual claim (queued, enforced, first attempt, hold active) is one statement that
    returns the turn ``running`` under its lease and what its hold reserved."""
    grant(pg_db, pg_admin, pg_user, "10")
    turn_id = submit(runtime, pg_db, pg_user, chat, "a question").id
    hold = fresh(pg_db, Hold, turn_id=turn_id)
    with counting(runtime.db.engine) as counts:
        claimed = turn_runner.claim(runtime, turn_id, takeover=False, owner="task-1")
    assert counts.statements == 1
    assert claimed.hold_amount == hold.amount > 0
    assert (claimed.turn.status, claimed.turn.attempts, claimed.turn.lease_owner) == ("running", 1, "task-1")
    stored = fresh(pg_db, Turn, id=turn_id)
    assert (stored.status, stored.attempts, stored.lease_owner) == ("running", 1, "task-1")
    assert stored.lease_expires_at == claimed.turn.lease_expires_at > stored.started_at
    assert turn_runner.claim(runtime, turn_id, takeover=False, owner="task-2") is None  # its lease is live


def test_a_queued_turn_whose_hold_expired_is_failed_by_its_claim(
    enforced, runtime, pg_db, pg_admin, pg_user, chat
):
    grant(pg_db, pg_admin, pg_user, "10")
    turn = submit(runtime, pg_db, pg_user, chat, "a question")
    pg_db.execute(update(Hold).where(Hold.turn_id == turn.id).values(expires_at=datetime.now(UTC)))
    pg_db.commit()
    assert billing.expire_stale_holds(pg_db) == 1
    assert turn_runner.claim(runtime, turn.id, takeover=False) is None
    failed = fresh(pg_db, Turn, id=turn.id)
    assert (failed.status, failed.error_code, failed.attempts) == ("failed", "hold_expired", 0)
    assert_books_clean(pg_db)


def test_the_claim_locks_the_turn_before_its_hold_as_a_cancel_does(
    enforced, runtime, pg_app, pg_admin, pg_user, chat
):
    """A cancel locks the turn, then its hold (to release it). A claim running meanwhile waits
    on the turn and must not hold the hold's row: the cancel takes it at once (NOWAIT), no
    deadlock, and the claim then finds the turn cancelled."""
    db = pg_app.extensions["tollgate"].db
    with db.session() as setup:
        grant(setup, pg_admin, pg_user, "10")
        turn = submit(runtime, setup, pg_user, chat, "a question")
    outcome: list = []
    with db.engine.connect() as cancel:
        cancel.execute(
            select(Turn.id).where(Turn.id == turn.id).with_for_update(key_share=True)
        )  # the cancel's turn lock
        claiming = threading.Thread(
            target=lambda: outcome.append(turn_runner.claim(runtime, turn.id, takeover=False))
        )
        claiming.start()
        time.sleep(0.5)
        assert claiming.is_alive()  # waiting for the turn
        cancel.execute(
            select(Hold.id).where(Hold.turn_id == turn.id).with_for_update(key_share=True, nowait=True)
        )
        cancel.execute(
            update(Turn).where(Turn.id == turn.id).values(status="cancelled", completed_at=datetime.now(UTC))
        )
        cancel.execute(update(Hold).where(Hold.turn_id == turn.id).values(status="released"))
        cancel.commit()
    claiming.join(timeout=10)
    assert outcome == [None]
    with db.session() as check:
        assert check.scalar(select(Turn.status).where(Turn.id == turn.id)) == "cancelled"


def test_the_settle_locks_the_turn_and_its_hold_in_one_statement_turn_first(
    enforced, runtime, pg_app, pg_admin, pg_user, chat
):
    """A completing turn's settlement locks the turn and its hold in one statement
    (``_lock_with_hold``), in the order a cancel takes them: while a cancel holds the turn,
    the settle waits on it and holds nothing, so the cancel gets the hold at once (NOWAIT).
    Once the cancel commits, the settle has both rows, locked."""
    db = pg_app.extensions["tollgate"].db
    with db.session() as setup:
        grant(setup, pg_admin, pg_user, "10")
        turn = submit(runtime, setup, pg_user, chat, "a question")
    locked: list = []

    def still_free(model, column) -> bool:
        with db.engine.connect() as other:
            try:
                other.execute(
                    select(model.id).where(column == turn.id).with_for_update(key_share=True, nowait=True)
                )
            except OperationalError:
                return False
            return True

    def settle_lock() -> None:
        with db.session() as session:
            found_turn, found_hold = turn_runner._lock_with_hold(session, turn.id)
            locked.append((found_turn.id, found_hold.turn_id, found_hold.status))
            locked.append((still_free(Turn, Turn.id), still_free(Hold, Hold.turn_id)))
            session.rollback()

    with db.engine.connect() as cancel:
        cancel.execute(select(Turn.id).where(Turn.id == turn.id).with_for_update(key_share=True))
        settling = threading.Thread(target=settle_lock)
        settling.start()
        time.sleep(0.5)
        assert settling.is_alive()  # waiting for the turn
        cancel.execute(
            select(Hold.id).where(Hold.turn_id == turn.id).with_for_update(key_share=True, nowait=True)
        )
        cancel.commit()
    settling.join(timeout=10)
    assert locked == [(turn.id, turn.id, "active"), (False, False)]

    with db.session() as session:
        assert turn_runner._lock_with_hold(session, new_id()) == (None, None)
    assert run(runtime, turn.id) == "completed"
    with db.session() as check:
        assert check.scalar(select(Hold.status).where(Hold.turn_id == turn.id)) == "captured"
        assert charged_for(check, turn.id) == check.get(Turn, turn.id).cost > 0
        assert_books_clean(check)


def test_a_turn_without_a_hold_is_locked_alone_for_its_settle(runtime, pg_db, pg_user, chat):
    """Enforcement off: no hold; the one statement still finds (and locks) the turn."""
    turn_id = submit(runtime, pg_db, pg_user, chat, "a question").id
    with runtime.db.session() as session:
        found_turn, found_hold = turn_runner._lock_with_hold(session, turn_id)
        assert (found_turn.id, found_hold) == (turn_id, None)
        session.rollback()
    assert run(runtime, turn_id) == "completed"


def test_a_turn_admitted_without_a_hold_says_so_and_is_claimed_in_one_statement_while_enforcement_is_off(
    runtime, pg_db, pg_client, pg_admin, pg_user, chat
):
    """Enforcement off: the turn has no hold, its message says ``held: False``, and its claim
    is one statement of its own (not the held turn's, which needs a hold, nor the locked
    transaction). Once enforcement is on, such a turn's claim is the transaction that
    places its hold (design §4: the worker re-checks the toggle)."""
    turn_id = submit(runtime, pg_db, pg_user, chat, "a question").id
    sent: list[dict] = []

    class Celery:
        def send_task(self, name, args=None, kwargs=None):
            sent.append(kwargs)

    assert fresh(pg_db, Turn, id=turn_id).enforced is False
    assert turns.enqueue_run(Celery(), turn_id, held=False) and sent == [{"held": False}]
    assert turns.enqueue_run(Celery(), turn_id, streamed=True) and sent[-1] == {"streamed": True}
    with counting(runtime.db.engine) as counts:
        claimed = turn_runner.claim(runtime, turn_id, takeover=False, held=False)
    assert (claimed.turn.status, claimed.turn.attempts, claimed.hold_amount) == ("running", 1, None)
    assert counts.statements == 1 and "queued_turn" not in counts.sql[0]
    assert turn_runner.claim(runtime, turn_id, takeover=False, held=False) is None  # running: not twice

    grant(pg_db, pg_admin, pg_user, "10")
    later = submit(runtime, pg_db, pg_user, chat, "another question").id
    response = pg_client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
    )
    assert response.status_code == 200
    with counting(runtime.db.engine) as counts:
        claimed = turn_runner.claim(runtime, later, takeover=False, held=False)
    # The turn locked first (the transaction), not the one statement.
    assert claimed.turn.status == "running" and counts.sql[0].startswith("SELECT turns.id")
    hold = pg_db.scalar(select(Hold).where(Hold.turn_id == later))
    assert hold is not None and hold.status == "active"


@pytest.mark.parametrize("enforcement", ["on", "off"])
def test_the_wallet_statement_writes_the_ended_turn_as_its_own_update_would(
    enforcement, runtime, pg_db, pg_client, pg_admin, pg_user, chat, monkeypatch
):
    """On Postgres a settled turn's row is written by the wallet's statement (a capture
    with enforcement on, a debit with it off): its cost, ``balance_after`` (the wallet's
    balance right after, as its ledger entry says) and ``low_balance`` (that balance under
    the threshold) are those the separate UPDATE wrote. The threshold is moved between
    the two turns so that the first ends above it and the second below."""
    if enforcement == "on":
        pg_client.patch(
            "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
        )
    grant(pg_db, pg_admin, pg_user, "10")
    ended, thresholds = [], []
    for content in ("first question", "second question"):
        turn_id = submit(runtime, pg_db, pg_user, chat, content).id
        thresholds.append(runtime.settings.low_balance_threshold)
        with counting(runtime.db.engine) as counts:
            assert run(runtime, turn_id) == "completed"
        # No UPDATE of its own (_write_turn's, columns in name order) after the wallet's.
        assert not any(sql.startswith("UPDATE turns SET balance_after") for sql in counts.sql)
        ended.append(fresh(pg_db, Turn, id=turn_id))
        # The next turn's charge takes the balance under this one's.
        just_under = ended[-1].balance_after - D("0.000001")
        monkeypatch.setattr(runtime, "settings", runtime.settings.replace(low_balance_threshold=just_under))
    for turn, threshold in zip(ended, thresholds, strict=True):
        entry = pg_db.scalar(
            select(LedgerEntry).where(
                LedgerEntry.turn_id == turn.id, LedgerEntry.kind.in_(("capture", "debit"))
            )
        )
        assert turn.status == "completed" and turn.reply and turn.completed_at is not None
        assert turn.cost == charged_for(pg_db, turn.id) > 0
        assert turn.balance_after == entry.balance_after
        assert turn.low_balance is (turn.balance_after < threshold)
    assert [turn.low_balance for turn in ended] == [False, True]
    assert ended[-1].balance_after == fresh(pg_db, Wallet, user_id=pg_user.id).balance
    assert_books_clean(pg_db)
