"""An HTTP front for Azurite's queue endpoint that reads requests the way Azure does.

Why: Azurite is kinder than Azure in one way that hides a real bug. Azure's pop receipts are base64 of
binary data (``AgAAAAMAAAAAAAAAYUMWAIg+1gE=``) and often hold ``+``, ``/`` and ``=``, and Azure reads
query strings form-encoded, so a ``+`` put in a query string unescaped arrives as a space: the request
is refused, with 403 AuthenticationFailed (the Shared Key signature the client computed over ``+`` no
longer matches) or 400 InvalidQueryParameterValue. Azurite's receipts are base64 of ASCII text, which
never holds a ``+``, so a client that forgets to percent-encode passes every test against Azurite.

``AzureQueueFront`` sits between a client and Azurite's queue endpoint and:

* replaces every pop receipt Azurite issues with an Azure-format one (base64 of 20 random bytes that
  holds both ``+`` and ``/``) before the client sees it, and maps it back on the way in;
* form-decodes query strings as Azure does and refuses a ``popreceipt`` it did not issue (400);
* checks Shared Key signatures as Azure computes them, over the form-decoded query (403), and re-signs
  what it forwards so that Azurite, which checks Shared Key too, accepts the substituted receipt;
* has knobs for fault tests: hold requests at a gate, forward requests but drop their answers, and
  refuse requests with an Azure-style error.

Only path-style URLs (``http://127.0.0.1:PORT/devstoreaccount1/<queue>/messages...``) are handled,
which is what Azurite serves on an IP address.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from types import TracebackType
from typing import Self
from urllib.parse import parse_qsl, quote
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# (method, path, query) -> bool; ``query`` is form-decoded, names lowercased, the last value of each.
Predicate = Callable[[str, str, Mapping[str, str]], bool]

OPERATIONS = ("receive", "send", "update", "delete", "peek", "other")

# Not forwarded either way: they describe one hop, not the request (RFC 9110 7.6.1). Host and
# Content-Length are set again by aiohttp for the new connection and the (possibly rewritten) body.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

# The standard headers of a Shared Key string-to-sign, in Azure's order (service version 2009-09-19+).
# The SDK signs "byte_range" (never a real header, so always empty) where Azure reads Range: the same
# for every request that sends no Range header, which queue requests never do.
_SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)

_MESSAGES = {
    "AuthenticationFailed": "Server failed to authenticate the request. Make sure the value of "
    "Authorization header is formed correctly including the signature.",
    "InvalidQueryParameterValue": "Value for one of the query parameters specified in the request URI "
    "is invalid.",
    "ServerBusy": "The server is currently unable to receive requests. Please retry your request.",
    "InternalError": "The server encountered an internal error. Please retry the request.",
    "OperationTimedOut": "Operation could not be completed within the specified time.",
    "MessageNotFound": "The specified message does not exist.",
    "QueueNotFound": "The specified queue does not exist.",
    "PopReceiptMismatch": "The specified pop receipt did not match the pop receipt for a dequeued message.",
}

_RECEIPT_IN_BODY = re.compile(rb"<PopReceipt>([^<]*)</PopReceipt>")


def operation_of(method: str, path: str, query: Mapping[str, str]) -> str:
    """receive/send/update/delete/peek, or other (queue create/delete/clear, metadata, listing...)."""
    # path-style: /<account>/<queue>/messages[/<message id>]
    parts = [part for part in path.split("/") if part]
    if len(parts) < 3 or parts[2] != "messages":
        return "other"
    method = method.upper()
    if len(parts) == 3:
        if method == "GET":
            return "peek" if query.get("peekonly", "").lower() == "true" else "receive"
        if method == "POST":
            return "send"
        return "other"  # DELETE .../messages is Clear Messages
    if len(parts) == 4:
        if method == "PUT":
            return "update"
        if method == "DELETE":
            return "delete"
    return "other"


def on(*operations: str, method: str | None = None) -> Predicate:
    """A predicate for the knobs: requests of these operations (and this method, if given)."""
    unknown = set(operations) - set(OPERATIONS)
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}; known: {OPERATIONS}")

    def matches(request_method: str, path: str, query: Mapping[str, str]) -> bool:
        if method is not None and request_method.upper() != method.upper():
            return False
        return operation_of(request_method, path, query) in operations

    return matches


def azure_receipt() -> str:
    """A pop receipt as Azure issues them: base64 of 20 random bytes, here always holding ``+`` and ``/``
    (so every receipt exercises both the form-decoding of ``+`` and the escaping of ``/``)."""
    while True:
        receipt = base64.b64encode(secrets.token_bytes(20)).decode("ascii")
        if "+" in receipt and "/" in receipt:
            return receipt


def _header(headers: CIMultiDictProxy[str] | CIMultiDict[str], name: str) -> str:
    # a header sent more than once signs as its values joined by commas
    return ",".join(value.strip() for value in headers.getall(name, []))


def string_to_sign(
    method: str,
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    account: str,
    path: str,
    params: Iterable[tuple[str, str]],
) -> str:
    """Azure's Shared Key string-to-sign for the Blob/Queue/File services, version 2009-09-19 and later.

    ``params`` are the query parameters already decoded the way Azure decodes them (form-decoding, so
    a raw ``+`` is a space): Azure signs what it read, not the bytes the client sent.
    """
    values = []
    for name in _SIGNED_HEADERS:
        value = _header(headers, name)
        if name == "content-length" and value == "0":
            value = ""  # since 2015-02-21 a zero Content-Length signs as empty
        values.append(value)
    ms_names = {name.lower() for name in headers if name.lower().startswith("x-ms-")}
    # Azure sorts with a culture-aware compare that skips hyphens at the first level (the SDK imitates
    # it with its own collation tables); the hyphen-free name first, then the name, gives that order.
    canonical_headers = "".join(
        f"{name}:{_header(headers, name)}\n"
        for name in sorted(ms_names, key=lambda name: (name.replace("-", ""), name))
    )
    # Path-style URLs (Azurite's): the account appears twice, "/<account>/<account>/<queue>/...".
    resource = f"/{account}{path}"
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        grouped.setdefault(name.lower(), []).append(value)
    for name in sorted(grouped):
        resource += f"\n{name}:{','.join(sorted(grouped[name]))}"
    return "\n".join([method.upper(), *values]) + "\n" + canonical_headers + resource


def sign(account_key: str, text: str) -> str:
    digest = hmac.new(base64.b64decode(account_key), text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def error_response(
    status: int,
    code: str,
    message: str | None = None,
    extra: Mapping[str, str] | None = None,
    version: str | None = None,
) -> web.Response:
    """An error answer shaped as Azure Storage sends them (XML body, ``x-ms-error-code``)."""
    request_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    time = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}0Z"
    text = f"{message or _MESSAGES.get(code, code)}\nRequestId:{request_id}\nTime:{time}"
    details = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in (extra or {}).items())
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(text)}</Message>{details}</Error>"
    )
    headers = {
        "Content-Type": "application/xml",
        "Server": "Windows-Azure-Queue/1.0 Microsoft-HTTPAPI/2.0",
        "x-ms-request-id": request_id,
        "x-ms-error-code": code,
        "Date": formatdate(usegmt=True),
    }
    if version:
        headers["x-ms-version"] = version
    return web.Response(status=status, body=body.encode("utf-8"), headers=headers)


class Gate:
    """Requests that match ``predicate`` wait here until ``open()``; ``await waiting(n)`` returns once
    ``n`` of them are waiting at the same time."""

    def __init__(self, predicate: Predicate) -> None:
        self.predicate = predicate
        self._opened = asyncio.Event()
        self._held = 0
        self._watchers: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def held(self) -> int:
        """How many requests wait at the gate now."""
        return self._held

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    def open(self) -> None:
        self._opened.set()

    async def waiting(self, n: int = 1) -> None:
        if self._held >= n:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._watchers.append(entry)
        try:
            await future
        finally:
            self._watchers.remove(entry)

    async def pass_through(self) -> None:
        if self._opened.is_set():
            return
        self._held += 1
        for n, future in self._watchers:
            if self._held >= n and not future.done():
                future.set_result(None)
        try:
            await self._opened.wait()
        finally:
            self._held -= 1


@dataclass
class _Rule:
    """A drop or refuse knob: applies to the next ``remaining`` matching requests (None: all of them)."""

    predicate: Predicate
    remaining: int | None
    status: int = 0
    code: str = ""
    hits: int = 0

    def take(self, method: str, path: str, query: Mapping[str, str]) -> bool:
        if self.remaining == 0 or not self.predicate(method, path, query):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        self.hits += 1
        return True


@dataclass
class Stats:
    # every request the front got, by (method, operation), refused ones included
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    # the requests that reached Azurite
    forwarded: Counter[tuple[str, str]] = field(default_factory=Counter)
    # answered by the front instead of Azurite: (operation, error code, detail)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    # forwarded, but the client's connection was aborted instead of answering
    dropped: int = 0
    receipts_issued: int = 0
    # messages (by path) that Azurite deleted: a delete retried after a lost answer counts once here
    deleted: set[str] = field(default_factory=set)

    def count(self, operation: str, method: str | None = None) -> int:
        return sum(n for (m, op), n in self.requests.items() if op == operation and method in (None, m))


class AzureQueueFront:
    """A reverse proxy in front of Azurite's queue endpoint that behaves as Azure does about pop receipts,
    query decoding and Shared Key (see the module docstring)::

        async with AzureQueueFront("127.0.0.1", azurite.queue_port, ACCOUNT, ACCOUNT_KEY) as front:
            conn = front.connection_string(azurite.blob_port)
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        account: str,
        account_key: str,
        host: str = "127.0.0.1",
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.account = account
        self.account_key = account_key
        self.host = host
        self.port = 0
        self.stats = Stats()
        # Azure receipt -> Azurite receipt and back. Never pruned: a stale receipt must still map, so
        # that Azurite answers it as it would (404 MessageNotFound / 400 PopReceiptMismatch).
        self._to_upstream: dict[str, str] = {}
        self._to_client: dict[str, str] = {}
        self._gates: list[Gate] = []
        self._drops: list[_Rule] = []
        self._refusals: list[_Rule] = []
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        # Our own socket: the port is known before anything connects, without aiohttp internals.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = int(sock.getsockname()[1])
        self._session = aiohttp.ClientSession()
        self._runner = web.ServerRunner(web.Server(self._handle), handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        for gate in self._gates:
            gate.open()  # held handlers finish instead of keeping the runner's shutdown waiting
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The queue service URL to give clients (path-style, as Azurite's)."""
        return f"http://{self.host}:{self.port}/{self.account}"

    def connection_string(self, blob_port: int, blob_host: str | None = None) -> str:
        """A Shared Key connection string: queues through this front, blobs straight to Azurite."""
        blob = f"http://{blob_host or self.upstream_host}:{blob_port}/{self.account}"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.account_key};"
            f"BlobEndpoint={blob};QueueEndpoint={self.url};"
        )

    def sas_connection_string(self, sas: str, blob_port: int, blob_host: str | None = None) -> str:
        """The same with a SAS token instead of the key."""
        blob = f"http://{blob_host or self.upstream_host}:{blob_port}/{self.account}"
        return f"BlobEndpoint={blob};QueueEndpoint={self.url};SharedAccessSignature={sas.lstrip('?')}"

    # --- knobs -----------------------------------------------------------------------------------

    def hold(self, predicate: Predicate) -> Gate:
        """Matching requests (that pass the Azure checks) wait before being forwarded until the gate
        opens."""
        gate = Gate(predicate)
        self._gates.append(gate)
        return gate

    def drop_responses(self, predicate: Predicate, count: int = 1) -> None:
        """Forward the next ``count`` matching requests, then abort the client's connection instead of
        answering: the request took effect, the client never learns it did."""
        self._drops.append(_Rule(predicate, count))

    def refuse(self, predicate: Predicate, status: int, code: str, count: int | None = None) -> None:
        """Answer matching requests (the next ``count``, or all) with ``status`` and an Azure error body
        for ``code``, without forwarding them."""
        self._refusals.append(_Rule(predicate, count, status, code))

    def reset_knobs(self) -> None:
        for gate in self._gates:
            gate.open()
        self._gates.clear()
        self._drops.clear()
        self._refusals.clear()

    # --- receipts --------------------------------------------------------------------------------

    def _issue(self, upstream: str) -> str:
        known = self._to_client.get(upstream)
        if known is not None:
            return known
        receipt = azure_receipt()
        while receipt in self._to_upstream:
            receipt = azure_receipt()
        self._to_upstream[receipt] = upstream
        self._to_client[upstream] = receipt
        self.stats.receipts_issued += 1
        return receipt

    def issued(self, receipt: str) -> bool:
        return receipt in self._to_upstream

    # --- the proxy -------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.rel_url.raw_path
        # As Azure reads it: form-decoded, so "+" is a space and "%2B" is "+".
        params = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)
        query = {name.lower(): value for name, value in params}
        method = request.method.upper()
        operation = operation_of(method, path, query)
        self.stats.requests[(method, operation)] += 1
        version = request.headers.get("x-ms-version")
        body = await request.read()

        authorization = request.headers.get("Authorization", "")
        # Only Shared Key is checked and re-signed. SAS (sig= in the query) does not sign the receipt,
        # so its requests go on as they are but for the receipt; Shared Key Lite, bearer tokens and
        # anonymous requests are passed on unchecked, for Azurite to judge.
        shared_key = authorization.startswith("SharedKey ")
        if shared_key:
            # Azure authenticates before it validates parameters: an unescaped "+" in a Shared Key
            # request is a 403, not a 400.
            refused = self._check_signature(request, path, params, authorization, version)
            if refused is not None:
                self.stats.refused.append((operation, "AuthenticationFailed", refused[1]))
                return refused[0]

        forwarded_params = []
        for name, value in params:
            if name.lower() == "popreceipt":
                upstream = self._to_upstream.get(value)
                if upstream is None:
                    reason = (
                        "The pop receipt is not one this service issued."
                        if _is_base64(value)
                        else "Invalid pop receipt format (a '+' sent unescaped reads as a space)."
                    )
                    self.stats.refused.append((operation, "InvalidQueryParameterValue", value))
                    return error_response(
                        400,
                        "InvalidQueryParameterValue",
                        extra={
                            "QueryParameterName": "popreceipt",
                            "QueryParameterValue": value,
                            "Reason": reason,
                        },
                        version=version,
                    )
                value = upstream
            forwarded_params.append((name, value))

        for rule in self._refusals:
            if rule.take(method, path, query):
                self.stats.refused.append((operation, rule.code, "refused by the test"))
                return error_response(rule.status, rule.code, version=version)

        for gate in list(self._gates):
            if gate.predicate(method, path, query):
                await gate.pass_through()

        drop = any(rule.take(method, path, query) for rule in self._drops)
        try:
            response = await self._forward(request, path, forwarded_params, body, sign_it=shared_key)
        except aiohttp.ClientError:
            # Azurite is gone: the client sees what a network failure looks like, a dead connection.
            return _abort(request)
        self.stats.forwarded[(method, operation)] += 1
        if operation == "delete" and response.status == 204:
            self.stats.deleted.add(path)
        if drop:
            self.stats.dropped += 1
            return _abort(request)
        return response

    def _check_signature(
        self,
        request: web.BaseRequest,
        path: str,
        params: list[tuple[str, str]],
        authorization: str,
        version: str | None,
    ) -> tuple[web.Response, str] | None:
        account, _, signature = authorization.removeprefix("SharedKey ").partition(":")
        text = string_to_sign(request.method, request.headers, self.account, path, params)
        expected = sign(self.account_key, text)
        if account == self.account and hmac.compare_digest(signature.strip(), expected):
            return None
        detail = (
            f"The MAC signature found in the HTTP request '{signature}' is not the same as any computed "
            f"signature. Server used following string to sign: '{text}'."
            if account == self.account
            else f"Issuer is not the account {self.account}: '{account}'."
        )
        response = error_response(
            403, "AuthenticationFailed", extra={"AuthenticationErrorDetail": detail}, version=version
        )
        return response, detail

    async def _forward(
        self,
        request: web.BaseRequest,
        path: str,
        params: list[tuple[str, str]],
        body: bytes,
        sign_it: bool,
    ) -> web.Response:
        assert self._session is not None, "start() first"
        # Every value percent-encoded (safe=""), so Azurite reads back exactly the decoded values.
        query = "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in params)
        url = URL(
            f"http://{self.upstream_host}:{self.upstream_port}{path}" + (f"?{query}" if query else ""),
            encoded=True,
        )
        # Accept-Encoding is left out too: the front must read the bodies to swap the receipts in them,
        # so they must come back uncompressed (it is not signed, so this changes no signature).
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _HOP_BY_HOP and name.lower() != "accept-encoding"
        )
        if sign_it:
            # The receipt (and maybe the encoding) changed, so the client's signature no longer fits;
            # Azurite checks Shared Key too. Sign what aiohttp will send: the same headers plus the
            # Content-Length of the body.
            signed = CIMultiDict(headers)
            if body:
                signed["Content-Length"] = str(len(body))
            text = string_to_sign(request.method, signed, self.account, path, params)
            headers["Authorization"] = f"SharedKey {self.account}:{sign(self.account_key, text)}"
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            data=body or None,
            allow_redirects=False,
            # aiohttp would add a Content-Type (octet-stream), which would break the signature, and an
            # Accept-Encoding, which would let Azurite compress what must be rewritten.
            skip_auto_headers=("Content-Type", "Accept-Encoding"),
        ) as upstream:
            payload = _RECEIPT_IN_BODY.sub(
                lambda m: b"<PopReceipt>%s</PopReceipt>" % self._issue(m[1].decode("ascii")).encode(),
                await upstream.read(),
            )
            out: CIMultiDict[str] = CIMultiDict()
            for name, value in upstream.headers.items():
                if name.lower() in _HOP_BY_HOP:
                    continue
                if name.lower() == "x-ms-popreceipt":
                    value = self._issue(value)
                out.add(name, value)
            return web.Response(status=upstream.status, reason=upstream.reason, body=payload, headers=out)


def _is_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


def _abort(request: web.BaseRequest) -> web.Response:
    """Close the client's connection without an answer (the response returned is never written)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=599)
