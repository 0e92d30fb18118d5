"""Find or start the Postgres, Redis and PgBouncer the test suite needs; print shell exports.

Used as ``eval "$(python scripts/test_services.py)"``. A server that answers at
TEST_DATABASE_URL / TEST_REDIS_URL / TEST_PGBOUNCER_URL (defaults: 127.0.0.1)
is used as it is. Otherwise a private one is started under var/test-services
from Debian's binaries, installing the package with apt-get when it is missing.
The private PgBouncer runs in transaction mode in front of the Postgres found
here, with a small server pool (``PGBOUNCER_POOL_SIZE``) so that the tests
through it prove a bounded number of server connections.
The admin console's browser tests need Debian's chromium and chromium-driver:
installed the same way when missing, and exported as TEST_CHROMIUM /
TEST_CHROMEDRIVER.
Progress goes to stderr; only ``export`` lines go to stdout.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / "var" / "test-services"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
PRIVATE_PG_PORT = 55432
PRIVATE_REDIS_PORT = 56379
PRIVATE_PGBOUNCER_PORT = 56432
PGBOUNCER_POOL_SIZE = 4


def say(message: str) -> None:
    print(f"[test-services] {message}", file=sys.stderr, flush=True)


def pg_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception as exc:
        say(f"postgres at {urlsplit(url).hostname}:{urlsplit(url).port} not usable: {exc}")
        return False


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except Exception as exc:
        say(f"redis not usable: {exc}")
        return False


def apt_install(*packages: str) -> None:
    say(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, stdout=sys.stderr)


def postgres_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        apt_install("postgresql")
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent


def run_as(user: str | None, argv: list[str]) -> None:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    # From "/": the caller's directory may be closed to ``user``.
    subprocess.run(argv, check=True, cwd="/", stdout=sys.stderr, stderr=sys.stderr)


def system_user(name: str) -> str:
    if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    return name


def state_dir(name: str, user: str | None) -> Path:
    """The directory a private server keeps its files in, owned by ``user`` (the system user
    it runs as, when this script runs as root). ``var/test-services/<name>`` when ``user`` can
    reach it; else one under the system's temporary directory: a checkout in a directory
    closed to other users (``mktemp -d`` makes them 0700) is out of the postgres user's reach,
    and PgBouncer could not open its log there, nor initdb write its data."""
    path = STATE / name
    path.mkdir(parents=True, exist_ok=True)
    if user is None:
        return path
    shutil.chown(path, user)
    if subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(path)]).returncode == 0:
        return path
    path = Path(tempfile.gettempdir()) / f"tollgate-test-services-{user}" / name
    say(f"{STATE} is closed to the {user} user: keeping {name}'s files in {path}")
    path.mkdir(parents=True, exist_ok=True)
    for directory in (path.parent, path):
        shutil.chown(directory, user)
        directory.chmod(0o700)
    return path


def start_private_postgres() -> str:
    url = f"postgresql://postgres@127.0.0.1:{PRIVATE_PG_PORT}/postgres"
    if pg_answers(url):
        return url
    bindir = postgres_bin()
    user = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = system_user("postgres")
    data = state_dir("pg", user)
    if not (data / "PG_VERSION").exists():
        run_as(user, [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"])
    say(f"starting private postgres on 127.0.0.1:{PRIVATE_PG_PORT}")
    run_as(
        user,
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(data / "server.log"),
            "-w",
            "-o",
            f"-p {PRIVATE_PG_PORT} -c listen_addresses=127.0.0.1 -k {data} "
            "-c fsync=off -c max_connections=200",
            "start",
        ],
    )
    if not pg_answers(url):
        raise SystemExit("private postgres did not come up")
    return url


def start_private_redis() -> str:
    url = f"redis://127.0.0.1:{PRIVATE_REDIS_PORT}/15"
    if redis_answers(url):
        return url
    server = shutil.which("redis-server")
    if server is None:
        apt_install("redis-server")
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
    STATE.mkdir(parents=True, exist_ok=True)
    say(f"starting private redis on 127.0.0.1:{PRIVATE_REDIS_PORT}")
    subprocess.run(
        [
            server,
            "--port",
            str(PRIVATE_REDIS_PORT),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(STATE),
            "--logfile",
            str(STATE / "redis.log"),
        ],
        check=True,
    )
    for _ in range(50):
        if redis_answers(url):
            return url
        time.sleep(0.1)
    raise SystemExit("private redis did not come up")


def pgbouncer_url_for(pg_url: str, port: int) -> str:
    """``pg_url`` with PgBouncer's address: same user and database names."""
    parts = urlsplit(pg_url)
    auth = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{auth}127.0.0.1:{port}").geturl()


def start_private_pgbouncer(pg_url: str) -> str:
    """PgBouncer in transaction mode on PRIVATE_PGBOUNCER_PORT, forwarding every database
    name to the Postgres at ``pg_url`` (trust auth, as that server uses)."""
    url = pgbouncer_url_for(pg_url, PRIVATE_PGBOUNCER_PORT)
    user = system_user("postgres") if os.geteuid() == 0 else None  # PgBouncer refuses to run as root
    state = state_dir("pgbouncer", user)
    pg = urlsplit(pg_url)
    config = (
        "[databases]\n"
        f"* = host={pg.hostname or '127.0.0.1'} port={pg.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {PRIVATE_PGBOUNCER_PORT}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {state / 'users.txt'}\n"
        f"admin_users = {pg.username or 'postgres'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {PGBOUNCER_POOL_SIZE}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
        "max_client_conn = 2000\n"
        # Test databases come and go: drop their server connections soon after.
        "server_idle_timeout = 10\n"
        f"logfile = {state / 'pgbouncer.log'}\npidfile = {state / 'pgbouncer.pid'}\n"
    )
    if pg_answers(url):  # one started earlier (by this script in any checkout): the tests read its settings
        return url
    binary = Path("/usr/sbin/pgbouncer")
    if not binary.exists():
        apt_install("pgbouncer")
    (state / "users.txt").write_text(f'"{pg.username or "postgres"}" ""\n')
    (state / "pgbouncer.ini").write_text(config)
    argv = [str(binary), "-d", str(state / "pgbouncer.ini")]
    if user:
        for path in state.iterdir():
            shutil.chown(path, user)
        argv[1:1] = ["-u", user]
    say(f"starting private pgbouncer on 127.0.0.1:{PRIVATE_PGBOUNCER_PORT} (transaction mode)")
    subprocess.run(argv, check=True, stdout=sys.stderr, stderr=sys.stderr)
    for _ in range(50):
        if pg_answers(url):
            return url
        time.sleep(0.1)
    raise SystemExit("private pgbouncer did not come up")


def browser() -> tuple[str, str]:
    """Headless Chromium and its WebDriver, from Debian's packages."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        apt_install("chromium", "chromium-driver")
        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise SystemExit("chromium / chromedriver are still missing after apt-get install")
    return chromium, driver


def main() -> int:
    pg_url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG
    if not pg_answers(pg_url):
        pg_url = start_private_postgres()
    redis_url = os.environ.get("TEST_REDIS_URL") or DEFAULT_REDIS
    if not redis_answers(redis_url):
        redis_url = start_private_redis()
    bouncer_url = os.environ.get("TEST_PGBOUNCER_URL")
    if not (bouncer_url and pg_answers(bouncer_url)):
        bouncer_url = start_private_pgbouncer(pg_url)
    say(f"postgres: {pg_url}")
    say(f"redis: {redis_url}")
    say(f"pgbouncer: {bouncer_url}")
    print(f"export TEST_DATABASE_URL='{pg_url}'")
    print(f"export TEST_REDIS_URL='{redis_url}'")
    print(f"export TEST_PGBOUNCER_URL='{bouncer_url}'")
    chromium, driver = browser()
    say(f"browser: {chromium} with {driver}")
    print(f"export TEST_CHROMIUM='{chromium}'")
    print(f"export TEST_CHROMEDRIVER='{driver}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
