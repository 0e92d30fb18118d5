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
        metadata={"description": "Also round-trip a ping task through a worker"},
    )


class ReadinessSchema(BaseSchema):
    status = fields.String(required=True, metadata={"description": "ok | unavailable"})
    version = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.Dict(), required=True)
    down = fields.List(fields.String(), required=True)
