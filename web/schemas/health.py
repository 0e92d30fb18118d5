from marshmallow import fields

from web.schemas.common import BaseSchema


class LivenessSchema(BaseSchema):
    status = fields.String(required=True)


class ReadinessQuerySchema(BaseSchema):
    # Only the spellings a JSON-Schema boolean has on the wire; "yes" or "1" is a 422.
    worker = fields.Boolean(
        load_default=False,
        truthy={"true"},
        falsy={"false"},
        metadata={
            "description": "Also round-trip a ping task through a worker (waits up to 3 s). "
            "Admin key only: 401 without one, 403 for a non-admin key"
        },
    )


class ReadinessSchema(BaseSchema):
    status = fields.String(required=True, metadata={"description": "`ok`"})
    version = fields.String(metadata={"description": "The code version (admin key only)"})
    checks = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(),
        metadata={"description": "Each dependency's check (admin key only)"},
    )
    down = fields.List(fields.String(), metadata={"description": "What is down: `[]` (admin key only)"})
