"""Who may reach the gateway and hold a session: listening rules, TLS, client addresses, resume
secrets and the fleet-wide session caps kept in Redis.

Everything that must hold across several gateways on one Redis lives in Redis: a session's
secret hash and owner sit in its meta hash, and each attachment (one session on one connection)
is a member of sorted sets scored by its lease expiry, one in total and one per principal (a
token name, or the client address for connections without a token). A gateway refreshes the
leases of its attachments, so those of a gateway that died lapse on their own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import ssl
import time

SECRET_BYTES = 24  # 192 random bits


def new_secret() -> tuple[str, str]:
    """(secret for the client, hash to store): the secret itself is never stored or logged."""
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return secret, hash_secret(secret)


def hash_secret(secret: str) -> str:
    # The secret has 192 random bits, so a plain hash is as strong as a slow one here.
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(given: str, stored_hash: str) -> bool:
    return bool(stored_hash) and hmac.compare_digest(hash_secret(given).encode(),
                                                     stored_hash.encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, "", 0.0.0.0: may be reachable from elsewhere


def check_listen(host: str, authenticated: bool, insecure: bool) -> None:
    if not is_loopback(host) and not authenticated and not insecure:
        raise ValueError(
            f"refusing to listen on {host or 'all addresses'!r} without authentication: set "
            "gateway.tokens (or gateway.auth_token), or set gateway.insecure_no_auth = true "
            "if anyone who can reach this address may use the gateway")


def ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("gateway.tls_cert and gateway.tls_key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_address(peer: str, headers, proxy_header: str, trusted: list[str]) -> str:
    """The client's address: the peer's, or the one a trusted proxy put last in its header."""
    if proxy_header and (not trusted or peer in trusted):
        value = headers.get(proxy_header) if headers is not None else None
        if value:
            return value.split(",")[-1].strip()[:64] or peer
    return peer


# KEYS: total set, principal set. ARGV: now, expiry, member, total cap, principal cap.
# Returns 0 when admitted, 1 when over the total cap, 2 when over the principal's.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[2], ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 0
end
if tonumber(ARGV[4]) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 1
end
if tonumber(ARGV[5]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  return 2
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 0
"""


class Attachments:
    """Fleet-wide count of attached sessions, in total and per principal."""

    LEASE_S = 60.0  # refreshed every LEASE_S / 3 by the gateway holding the attachment

    def __init__(self, redis, prefix: str):
        self.redis = redis
        self.prefix = prefix
        self._admit = redis.register_script(_ADMIT)

    def _keys(self, principal: str) -> list[str]:
        # one hash slot for both, so the script also runs on a cluster
        return [f"{self.prefix}:{{attached}}", f"{self.prefix}:{{attached}}:{principal}"]

    async def admit(self, member: str, principal: str, cap_total: int,
                    cap_principal: int) -> str | None:
        """None when admitted, else why not (for a too_many_sessions error)."""
        now = time.time()
        res = int(await self._admit(keys=self._keys(principal),
                                    args=[now, now + self.LEASE_S, member, cap_total,
                                          cap_principal]))
        if res == 1:
            return f"the gateway fleet has its maximum of {cap_total} attached sessions"
        if res == 2:
            who = principal.split(":", 1)
            what = f"token {who[1]!r}" if who[0] == "token" else "this client address"
            return f"{what} already has its maximum of {cap_principal} attached sessions"
        return None

    async def release(self, member: str, principal: str) -> None:
        async with self.redis.pipeline(transaction=False) as p:
            for key in self._keys(principal):
                p.zrem(key, member)
            await p.execute()

    async def refresh(self, held: list[tuple[str, str]]) -> None:
        expiry = time.time() + self.LEASE_S
        async with self.redis.pipeline(transaction=False) as p:
            for member, principal in held:
                for key in self._keys(principal):
                    p.zadd(key, {member: expiry}, xx=True)
            await p.execute()
