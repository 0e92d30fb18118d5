import io

from flask import current_app, send_file
from flask.views import MethodView
from flask_smorest import Page
from werkzeug.exceptions import RequestEntityTooLarge

from shared.errors import FileTooLarge
from shared.services import files
from web.api import Blueprint
from web.context import current_user, db, runtime
from web.errors import error_body
from web.schemas.common import ErrorSchema
from web.schemas.files import FileUploadSchema, UploadedFileSchema

blp = Blueprint("files", __name__, url_prefix="/api/v1", description="Uploaded files")


@blp.errorhandler(RequestEntityTooLarge)
def _body_too_large(_exc):
    # Werkzeug refuses bodies past MAX_CONTENT_LENGTH before the service sees them;
    # for an upload that is the same answer as the service's own size check.
    limit = runtime().settings.max_upload_bytes
    body = error_body(413, FileTooLarge.message, FileTooLarge.error, max_bytes=limit)
    return body, 413


@blp.route("/rooms/<string:room_id>/files")
class RoomFiles(MethodView):
    @blp.response(200, UploadedFileSchema(many=True))
    @blp.alt_response(404, schema=ErrorSchema)
    @blp.paginate(Page)
    def get(self, room_id):
        """List a room's files, newest first"""
        return files.list_files(db(), current_user().id, room_id)

    @blp.arguments(FileUploadSchema, location="files")
    @blp.response(201, UploadedFileSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    @blp.alt_response(413, schema=ErrorSchema, description="`file_too_large`")
    @blp.alt_response(415, schema=ErrorSchema, description="`unsupported_media_type`")
    @blp.alt_response(
        422, schema=ErrorSchema, description="`file_required`, `empty_file` or `invalid_filename`"
    )
    def post(self, data, room_id):
        """Upload a file to a room; its text is extracted in the background (status pending → ready)"""
        return files.upload_and_enqueue(
            db(),
            current_user().id,
            room_id,
            data["file"],
            max_bytes=runtime().settings.max_upload_bytes,
            celery_app=current_app.extensions["celery"],
        )


@blp.route("/files/<string:file_id>")
class FileItem(MethodView):
    @blp.response(200, UploadedFileSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, file_id):
        """Get a file's metadata and extraction status"""
        return files.owned_file(db(), current_user().id, file_id)

    @blp.response(204)
    @blp.alt_response(404, schema=ErrorSchema)
    def delete(self, file_id):
        """Delete a file"""
        files.delete_file(db(), current_user().id, file_id)


@blp.route("/files/<string:file_id>/content")
class FileContent(MethodView):
    @blp.response(200, description="The original bytes, with the stored content type, as an attachment")
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, file_id):
        """Download a file's original bytes"""
        stored = files.file_content(db(), current_user().id, file_id)
        response = send_file(
            io.BytesIO(stored.data),
            mimetype=stored.content_type,
            as_attachment=True,
            download_name=stored.filename,
            etag=stored.sha256,
            max_age=0,
        )
        # Exactly the stored type (send_file would append a second charset to text types).
        response.headers["Content-Type"] = stored.content_type
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
