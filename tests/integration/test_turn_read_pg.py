"""``GET /turns/{id}`` on Postgres: the Core read gives the ORM dump's JSON byte for byte
(tests/web/test_turn_read.py on SQLite), and another user's turn is 404."""

from __future__ import annotations

from tests.factories import make_actor
from tests.web.test_turn_read import assert_read_as_the_orm_turn_dumps, seed_turn


def test_a_turn_reads_as_its_orm_dump_on_postgres(pg_app, pg_client, pg_db, pg_user):
    for tool_calls in (True, False):
        turn_id = seed_turn(pg_db, pg_user.id, tool_calls=tool_calls)
        read = assert_read_as_the_orm_turn_dumps(pg_app, pg_client, pg_db, pg_user, turn_id)
        assert len(read["tool_calls"]) == (3 if tool_calls else 0)
        other = make_actor(pg_db)
        assert pg_client.get(f"/api/v1/turns/{turn_id}", headers=other.headers).status_code == 404
