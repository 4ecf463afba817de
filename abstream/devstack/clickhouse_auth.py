"""Who may query the embedded ClickHouse endpoint.

On loopback (``--host`` in 127.0.0.0/8, ``::1`` or ``localhost``) anyone may, as any user with any password:
development and the tests connect as ``default`` with no password, and only this machine can reach the port.

Bound to any other address, every request except the pings (``/ping``, ``/replicas_status``, a bare ``GET /``,
which a real server answers without credentials too) must present the user and password of CLICKHOUSE_URL
(``Settings.clickhouse_url``, read as ``abstream.clickhouse.connect_args`` reads it, so the endpoint expects
exactly what the gateway and the workers send). Credentials are read where ClickHouse's HTTP handler reads them:
``X-ClickHouse-User`` / ``X-ClickHouse-Key`` headers, else HTTP Basic auth (what clickhouse-connect sends), else
the ``user`` / ``password`` URL arguments (absent: ``default`` and no password); mixing two of those ways is
refused, as ClickHouse refuses it. Both user and password are compared in constant time (``hmac.compare_digest``).
A wrong user or password is answered as ClickHouse answers it: ``Code: 516. DB::Exception: USER: Authentication
failed: ... (AUTHENTICATION_FAILED)``, header ``X-ClickHouse-Exception-Code: 516``, HTTP status 403 (what
ClickHouse's exceptionCodeToHTTPStatus sends for AUTHENTICATION_FAILED).

Off loopback with no password in CLICKHOUSE_URL the endpoint refuses to start (``Authenticator.off_loopback``
raises SettingsError: one line on stderr, exit status 2): anyone who reaches the port could read and change every
table.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Mapping

from abstream.config import Settings, SettingsError
from abstream.devstack.clickhouse_errors import AUTHENTICATION_FAILED, ClickHouseError


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; any other name may resolve to anything: not loopback."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _failed(text: str) -> ClickHouseError:
    return ClickHouseError.new(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED", text)


def presented_credentials(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[bytes, bytes]:
    """The user and password a request presents, as raw bytes, read as ClickHouse's HTTPHandler reads them.

    ``headers`` have lower-case names and latin-1 values (as ASGI gives them, so ``encode("latin-1")`` restores
    the bytes sent); ``params`` are the decoded URL arguments.
    """
    header_user = headers.get("x-clickhouse-user", "")
    header_key = headers.get("x-clickhouse-key", "")
    authorization = headers.get("authorization", "")
    by_params = "user" in params or "password" in params
    if header_user or header_key:
        if authorization or by_params:
            raise _failed(
                "Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers "
                "and other authentication methods simultaneously"
            )
        return (header_user or "default").encode("latin-1"), header_key.encode("latin-1")
    if authorization:
        if by_params:
            raise _failed(
                "Invalid authentication: it is not allowed to use Authorization HTTP header "
                "and authentication via parameters simultaneously"
            )
        scheme, _, info = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            raise _failed(f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported")
        try:
            decoded = base64.b64decode(info.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise _failed("Invalid authentication: malformed Basic credentials") from None
        user, _, password = decoded.partition(b":")
        return user or b"default", password
    return params.get("user", "default").encode("utf-8"), params.get("password", "").encode("utf-8")


class Authenticator:
    """Admits requests that present one user and password (CLICKHOUSE_URL's); compares in constant time."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self._user = user.encode("utf-8")
        self._password = password.encode("utf-8")

    @classmethod
    def off_loopback(cls, host: str, settings: Settings) -> Authenticator:
        """CLICKHOUSE_URL's user and password, for an endpoint bound to ``host`` (off loopback). Raises
        SettingsError when that URL has no password: anyone who reaches the port could read and change every table.
        """
        from abstream.clickhouse import connect_args  # clickhouse-connect: loaded only when credentials are needed

        args = connect_args(settings, database=None)
        if not args["password"]:
            raise SettingsError(
                f"the ClickHouse endpoint would listen on {host} (off loopback) and CLICKHOUSE_URL has no password, "
                "leaving every table open to the network: put the password clients must send in CLICKHOUSE_URL "
                "(http://user:password@host:port), or bind 127.0.0.1"
            )
        return cls(args["username"], args["password"])

    def check(self, headers: Mapping[str, str], params: Mapping[str, str]) -> None:
        """Raise the ClickHouse AUTHENTICATION_FAILED error unless the request presents this user and password."""
        user, password = presented_credentials(headers, params)
        user_ok = hmac.compare_digest(user, self._user)
        password_ok = hmac.compare_digest(password, self._password)  # both compared: no early exit on the user
        if not (user_ok and password_ok):
            name = user.decode("utf-8", "replace")
            raise _failed(f"{name}: Authentication failed: password is incorrect, or there is no user with such name")
