from flask import Response, current_app, request, url_for
from flask.views import MethodView
from flask_smorest import Page

from shared import metrics
from shared.services import rooms, turn_runner, turns
from web import finished_turns, streaming
from web.api import Blueprint
from web.context import current_api_key_id, current_user, db, idempotency_key, runtime
from web.schemas.chat import (
    RoomCreateSchema,
    RoomSchema,
    SessionCreateSchema,
    SessionSchema,
    TurnCreateSchema,
    TurnSchema,
)
from web.schemas.common import ErrorSchema

blp = Blueprint("chat", __name__, url_prefix="/api/v1", description="Rooms, sessions and turns")


@blp.route("/rooms")
class Rooms(MethodView):
    @blp.response(200, RoomSchema(many=True))
    @blp.paginate(Page)
    def get(self):
        """List my rooms, newest first"""
        return rooms.list_rooms(db(), current_user().id)

    @blp.arguments(RoomCreateSchema)
    @blp.response(201, RoomSchema)
    def post(self, data):
        """Create a room"""
        return rooms.create_room(db(), current_user().id, data["name"])


@blp.route("/rooms/<string:room_id>")
class RoomItem(MethodView):
    @blp.response(200, RoomSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, room_id):
        """Get a room"""
        return rooms.owned_room(db(), current_user().id, room_id)


@blp.route("/rooms/<string:room_id>/sessions")
class RoomSessions(MethodView):
    @blp.response(200, SessionSchema(many=True))
    @blp.alt_response(404, schema=ErrorSchema)
    @blp.paginate(Page)
    def get(self, room_id):
        """List a room's sessions, newest first"""
        return rooms.list_sessions(db(), current_user().id, room_id)

    @blp.arguments(SessionCreateSchema)
    @blp.response(201, SessionSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def post(self, data, room_id):
        """Start a session in a room"""
        return rooms.create_session(db(), current_user().id, room_id, data["title"])


@blp.route("/sessions/<string:session_id>")
class SessionItem(MethodView):
    @blp.response(200, SessionSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, session_id):
        """Get a session, with its rolling summary"""
        return rooms.owned_session(db(), current_user().id, session_id)


@blp.route("/sessions/<string:session_id>/turns")
class SessionTurns(MethodView):
    @blp.response(200, TurnSchema(many=True))
    @blp.alt_response(404, schema=ErrorSchema)
    @blp.paginate(Page)
    def get(self, session_id):
        """List a session's turns in order"""
        return turns.list_turns(db(), current_user().id, session_id)

    @blp.arguments(TurnCreateSchema)
    @blp.response(201, TurnSchema, description="Completed within TURN_WAIT_SECONDS")
    @blp.alt_response(
        200,
        schema={"type": "string", "description": "text/event-stream"},
        content_type="text/event-stream",
        description="`stream: true`: Server-Sent Events `turn`, `delta`, `tool_call`, `done` (docs/turns.md)",
    )
    @blp.alt_response(202, schema=TurnSchema, description="Accepted; poll the Location")
    @blp.alt_response(
        402,
        schema=ErrorSchema,
        description="`insufficient_balance` (enforcement on) or `spend_limit_reached`",
    )
    @blp.alt_response(404, schema=ErrorSchema)
    @blp.alt_response(409, schema=ErrorSchema, description="`idempotency_conflict`")
    @blp.alt_response(
        429,
        schema=ErrorSchema,
        description="`rate_limited` or `too_many_concurrent_turns`, with `Retry-After`",
        headers={"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    )
    def post(self, data, session_id):
        """Submit a turn; waits for completion up to TURN_WAIT_SECONDS, or streams it"""
        stream = data.pop("stream", False)
        prefer_async = "respond-async" in request.headers.get("Prefer", "").lower()
        outcome = turns.submit_and_wait(
            runtime(),
            db(),
            current_user(),
            session_id,
            data,
            idempotency_key(),
            celery_app=current_app.extensions["celery"],
            wait=not (prefer_async or stream),
            streamed=stream,
            api_key_id=current_api_key_id(),
        )
        headers = {"Location": url_for("chat.TurnItem", turn_id=outcome.turn.id)}
        if stream:
            # Errors found before the turn existed were raised above, as JSON.
            metrics.stream_opened("turns")
            db().commit()
            response = streaming.event_stream(streaming.turn_events_body(runtime(), outcome.turn.id, None))
            response.headers.update(headers)
            return response
        # 201 and 202 are both contract (design §3): the one place a view picks its status.
        return outcome.turn, (201 if outcome.finished else 202), headers


@blp.route("/turns/<string:turn_id>")
class TurnItem(MethodView):
    @blp.response(200, TurnSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, turn_id):
        """Get a turn"""
        return finished_turns.read(turn_id)


@blp.route("/turns/<string:turn_id>/events")
class TurnEvents(MethodView):
    @blp.response(
        200,
        schema={"type": "string", "description": "text/event-stream"},
        content_type="text/event-stream",
        description="Server-Sent Events from the start, or after the `Last-Event-ID` header's event",
    )
    @blp.alt_response(204, description="`Last-Event-ID: done`: the stream already ended (EventSource stops)")
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, turn_id):
        """Attach to a turn's event stream (resume with Last-Event-ID)"""
        turn = turns.owned_turn(db(), current_user().id, turn_id)
        db().commit()
        last_event_id = request.headers.get("Last-Event-ID")
        if (last_event_id or "").strip() == streaming.DONE:
            return Response(status=204)
        metrics.stream_opened("turns")
        if last_event_id:
            metrics.stream_resumed()
        return streaming.event_stream(streaming.turn_events_body(runtime(), turn.id, last_event_id))


@blp.route("/turns/<string:turn_id>/cancel")
class TurnCancel(MethodView):
    @blp.response(200, TurnSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    @blp.alt_response(409, schema=ErrorSchema, description="`turn_finished`: it completed or failed first")
    def post(self, turn_id):
        """Cancel a turn: stop generating, bill what was used, release the rest"""
        return turn_runner.cancel(runtime(), db(), current_user().id, turn_id)
