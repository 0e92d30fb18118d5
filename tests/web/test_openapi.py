def test_the_spec_is_served_and_documents_auth(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    spec = response.get_json()
    assert spec["info"]["title"] == "Tollgate"
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    me = spec["paths"]["/api/v1/auth/me"]["get"]
    assert me["security"] == [{"bearerAuth": []}]
    assert "401" in me["responses"] and "403" not in me["responses"]
    users = spec["paths"]["/api/v1/admin/users"]["post"]
    assert {"401", "403", "201", "422"} <= set(users["responses"])
    health = spec["paths"]["/api/v1/health"]["get"]
    assert "security" not in health


def test_the_docs_ui_is_served(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    assert b"swagger" in response.data.lower()
