"""Streaming at I/O speed with the Procfile's own pools: one gunicorn gevent web process
relays 30 SSE streams at once from one gevent turn worker (no thread per stream), every
stream ends in ``done`` with its deltas making the reply, and a stream resumed with
Last-Event-ID through gunicorn loses and repeats nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx

from shared.services import pricing
from tests.integration.faults import assert_each_turn_billed_once
from tests.integration.test_faults_pg import assert_ledger_check_passes
from tests.sse import Event, parse

pytest_plugins = ["tests.integration.test_io_pools_pg"]

MODEL = "stream-model"


def test_one_gevent_web_process_relays_30_streams_at_once(
    web, turn_worker, upstream, io_settings, pg_db, pg_client, pg_admin, pg_user
):
    from tests.integration.test_io_pools_pg import new_sessions

    pricing.set_price(pg_db, pg_admin.id, MODEL, Decimal("0.001000"), Decimal("0.002000"))
    upstream.stream_delay = 0.1  # ~40 chunks per answer: every stream is open for seconds
    turn_worker()
    clients = 30
    sessions = new_sessions(web, pg_user, clients)

    def streamed(index: int) -> list[Event]:
        with httpx.Client(base_url=web, headers=pg_user.headers, timeout=60) as client:
            with client.stream(
                "POST",
                f"/sessions/{sessions[index]}/turns",
                json={"content": f"stream question number {index} " * 8, "model": MODEL, "stream": True},
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                return [e for e in parse(response.iter_text()) if isinstance(e, Event)]

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(streamed, range(clients)))
    for received in results:
        final = received[-1]
        assert final.event == "done" and final.data["status"] == "completed", final
        assert "".join(e.data["text"] for e in received if e.event == "delta") == final.data["reply"]
    assert upstream.peak_in_flight == clients  # every model call streamed at once

    # Re-attach through gunicorn after the 5th event: exactly the rest.
    whole = results[0]
    turn_id = whole[0].data["id"]
    with httpx.Client(base_url=web, headers=pg_user.headers, timeout=30) as client:
        with client.stream(
            "GET", f"/turns/{turn_id}/events", headers={"Last-Event-ID": whole[4].id}
        ) as response:
            rest = [e for e in parse(response.iter_text()) if isinstance(e, Event)]
    assert [(e.id, e.data) for e in rest[:-1]] == [(e.id, e.data) for e in whole[5:-1]]
    assert rest[-1].event == "done"
    assert_each_turn_billed_once(io_settings, [received[0].data["id"] for received in results])
    assert_ledger_check_passes(io_settings)
