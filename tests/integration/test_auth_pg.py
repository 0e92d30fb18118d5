from concurrent.futures import ThreadPoolExecutor

from shared.errors import Conflict
from shared.models import User, Wallet
from shared.services import auth


def test_concurrent_creates_of_one_email_make_one_user_with_one_wallet(pg_app, pg_db):
    database = pg_app.extensions["tollgate"].db

    def create(_):
        with database.session() as session:
            try:
                auth.create_user(session, "race@example.com", "user")
                return "created"
            except Conflict:
                return "conflict"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(create, range(16)))
    assert outcomes.count("created") == 1
    assert outcomes.count("conflict") == 15
    assert pg_db.query(User).filter_by(email="race@example.com").count() == 1
    assert pg_db.query(Wallet).count() == 1


def test_admin_api_on_postgres(pg_client, pg_admin, pg_user):
    response = pg_client.post(
        "/api/v1/admin/users", json={"email": "pg@example.com"}, headers=pg_admin.headers
    )
    assert response.status_code == 201
    secret = response.get_json()["api_key"]
    me = pg_client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 200 and me.get_json()["wallet"]["balance"] == "0.000000"
    assert pg_client.get("/api/v1/admin/users", headers=pg_user.headers).status_code == 403
