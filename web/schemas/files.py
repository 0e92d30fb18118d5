from flask_smorest.fields import Upload
from marshmallow import fields

from web.schemas.common import BaseSchema


class FileUploadSchema(BaseSchema):
    """multipart/form-data with one part, ``file``. Missing → 422 ``file_required`` (from the service)."""

    file = Upload(
        load_default=None,
        metadata={"description": "A .txt, .md, .csv, .json (UTF-8) or .pdf file, at most MAX_UPLOAD_BYTES"},
    )


class UploadedFileSchema(BaseSchema):
    """UploadedFileRead."""

    id = fields.String(required=True)
    room_id = fields.String(required=True)
    filename = fields.String(required=True, metadata={"description": "The sanitised name"})
    content_type = fields.String(required=True)
    size_bytes = fields.Integer(required=True)
    sha256 = fields.String(required=True)
    status = fields.String(required=True, metadata={"description": "pending | ready | failed"})
    error = fields.String(allow_none=True, metadata={"description": "Why extraction failed"})
    created_at = fields.DateTime(required=True)
