"""The admin console: server-rendered HTML pages at ``/admin/`` (design §9, docs/admin_console.md).

- **Sign-in**: an admin API key is exchanged for a server-side session
  (``shared/services/admin_sessions.py``); the browser gets a random token in an
  HttpOnly, SameSite=Strict cookie (Secure when the request came over HTTPS) and
  never the key.
- **CSRF**: every POST but the sign-in carries the session's token in a hidden
  field; without it, or with another, nothing changes (403).
- **One rule, one place**: each change calls the service the JSON API calls, so
  validation, idempotency and audit events are the API's.
- **Assets**: templates, CSS and JS ship in this package; charts are inline SVG
  drawn on the server. The Content-Security-Policy allows this origin only.
"""
