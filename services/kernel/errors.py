"""The one catalogue of error codes.

A code is a stable string a channel can act on. The same code appears in HTTP
answers, in events (``*.rejected`` / ``*.failed``), in dead-letter entries and
in metric labels. ``docs/errors.md`` is generated from this table
(``bubuh errors --markdown``), so the two never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    code: str
    http_status: int
    meaning: str
    action: str
    retryable: bool = False

    def text(self, detail: str) -> str:
        """``CODE: detail``, where a code travels as text (a delivery's ``last_error``)."""
        return f"{self.code}: {detail}"


_CATALOGUE: dict[str, ErrorCode] = {}


def _code(code: str, http_status: int, meaning: str, action: str, retryable: bool = False) -> ErrorCode:
    if code in _CATALOGUE:
        raise ValueError(f"error code {code} is catalogued twice")
    entry = ErrorCode(code, http_status, meaning, action, retryable)
    _CATALOGUE[code] = entry
    return entry


# --- requests in general -------------------------------------------------------------------
UNAUTHENTICATED = _code("UNAUTHENTICATED", 401, "No or unknown API key.", "Send `Authorization: Bearer <api key>`.")
CHANNEL_INACTIVE = _code("CHANNEL_INACTIVE", 403, "The channel is suspended.", "Contact the issuer's operations.")
NOT_FOUND = _code("NOT_FOUND", 404, "No such resource for this channel.", "Check the id; a channel sees only its own.")
BODY_INVALID = _code("BODY_INVALID", 422, "The body is not valid JSON of the documented shape.",
                     "Fix the field named in `detail`; do not retry unchanged.")
BODY_TOO_LARGE = _code("BODY_TOO_LARGE", 413, "The body exceeds the route's size limit.", "Send a smaller body.")
REQUEST_HEAD_TOO_LARGE = _code("REQUEST_HEAD_TOO_LARGE", 431,
                               "The request line and headers exceed 32 KiB; the connection is closed.",
                               "Send fewer or shorter headers.")
UNSUPPORTED_MEDIA_TYPE = _code("UNSUPPORTED_MEDIA_TYPE", 415, "Wrong Content-Type for this route.",
                               "Send `application/json` (or multipart for stamps).")
IDEMPOTENCY_MISMATCH = _code("IDEMPOTENCY_MISMATCH", 409,
                             "The idempotency key was used before with a different body.",
                             "Use a new key for a new order; never reuse one with other values.")
HANDLER_CRASHED = _code("HANDLER_CRASHED", 500, "A consumer raised an unexpected error on this record.",
                        "Operations: read the dead-letter entry's detail, fix, then `bubuh replay`.")
INTERNAL = _code("INTERNAL", 500, "An unexpected error in the platform.",
                 "Retry later with the same idempotency key; report the `trace_id` if it persists.")
UNAVAILABLE = _code("UNAVAILABLE", 503, "A dependency (Kafka, PostgreSQL, a document reader) cannot serve this "
                    "request now, or the platform is stopping.",
                    "Retry with the same idempotency key after `Retry-After` seconds.", retryable=True)

# --- purchases -----------------------------------------------------------------------------
AMOUNT_MISMATCH = _code("AMOUNT_MISMATCH", 422, "`amount` is not `quantity` x 10000 (Rp).", "Send the exact amount.")
QUANTITY_OUT_OF_RANGE = _code("QUANTITY_OUT_OF_RANGE", 422, "`quantity` must be 1..10000.", "Split large orders.")
ACCOUNT_ID_INVALID = _code("ACCOUNT_ID_INVALID", 422,
                           "`account_id` must be 1-64 characters of A-Z a-z 0-9 . _ : @ -.",
                           "Send the channel's own account identifier in that alphabet.")
PAID_AT_IN_FUTURE = _code("PAID_AT_IN_FUTURE", 422, "`paid_at` lies in the future.", "Send the real payment time.")
CHANNEL_UNKNOWN = _code("CHANNEL_UNKNOWN", 403, "The event names a channel the platform does not know.",
                        "Register the channel first (`bubuh channel add`).")
SIGNATURE_MISSING = _code("SIGNATURE_MISSING", 401, "A channel event carries no HMAC header.",
                          "Add the `bubuh-hmac` header: hex HMAC-SHA256 of the value with the channel secret.")
SIGNATURE_INVALID = _code("SIGNATURE_INVALID", 401,
                          "A channel event's HMAC does not match the secret of the channel its payload names.",
                          "Sign the exact record value with the current (or, during a rotation, the previous) "
                          "secret of the channel named in `channel_id` (docs/channels.md).")
SIGNATURE_KEY_EXPIRED = _code("SIGNATURE_KEY_EXPIRED", 401,
                              "A channel event is signed with a secret whose rotation grace period has ended.",
                              "Sign with the channel's current secret (`bubuh channel rotate-secret` printed it).")
EVENT_MALFORMED = _code("EVENT_MALFORMED", 400, "A Kafka record is not a valid protobuf envelope.",
                        "Publish with the contracts in `proto/`.")
EVENT_UNDECODABLE = _code("EVENT_UNDECODABLE", 400,
                          "A fetched batch could not be decoded (corrupt, or a compression codec the consumer lacks).",
                          "Operations: the dead-letter marker names topic, partition and offsets; publish those "
                          "records again with none, gzip, snappy, lz4 or zstd.")
EVENT_TYPE_UNKNOWN = _code("EVENT_TYPE_UNKNOWN", 400, "The envelope's type is not expected on this topic.",
                           "Publish each event type to its documented topic.")

# --- quota ---------------------------------------------------------------------------------
QUOTA_INSUFFICIENT = _code("QUOTA_INSUFFICIENT", 402, "The account has no available unit.",
                           "Buy quota; the request is not charged.")
RESERVATION_UNKNOWN = _code("RESERVATION_UNKNOWN", 409, "Commit or release for a reservation that does not exist.",
                            "Operations: inspect the dead-letter entry.")
RESERVATION_VOIDED = _code("RESERVATION_VOIDED", 409,
                           "Commit for a reservation already voided (expired or released).",
                           "The unit was returned; the stamp must be requested again.")
RESERVATION_POSTED = _code("RESERVATION_POSTED", 409, "Release for a reservation already committed.",
                           "Nothing to do: the stamp was issued and charged once.")
RESERVATION_EXPIRED = _code("RESERVATION_EXPIRED", 409, "The reservation passed its deadline before stamping.",
                            "The unit was returned; request the stamp again.")

# --- stamping ------------------------------------------------------------------------------
PDF_INVALID = _code("PDF_INVALID", 422, "The file is not a PDF.", "Upload a PDF document.")
PDF_MALFORMED = _code("PDF_MALFORMED", 422, "The PDF cannot be parsed.", "Re-export the document and upload again.")
PDF_ENCRYPTED = _code("PDF_ENCRYPTED", 422, "The PDF is encrypted or password protected.",
                      "Upload an unprotected copy.")
PDF_TOO_LARGE = _code("PDF_TOO_LARGE", 413, "The PDF exceeds the profile's size limit.",
                      "Compress the document (the `cpns` profile allows 800 KB).")
PROFILE_VIOLATION = _code("PROFILE_VIOLATION", 422,
                          "The document breaks its profile's rules (page size, PDF version).",
                          "See `detail`; for `cpns`: A4 pages, PDF 1.6 or later.")
PROFILE_UNKNOWN = _code("PROFILE_UNKNOWN", 422, "No such document profile.", "Use `standard` or `cpns`.")
PLACEMENT_INVALID = _code("PLACEMENT_INVALID", 422, "The page does not exist or the box lies outside it.",
                          "Send a page number and a box (PDF points) inside that page.")
SIGNING_FAILED = _code("SIGNING_FAILED", 500, "The signer could not stamp this document.",
                       "The unit was returned; contact operations with the request id.")
STORAGE_UNAVAILABLE = _code("STORAGE_UNAVAILABLE", 503, "The document store did not answer.",
                            "Retried automatically.", retryable=True)
TSA_UNAVAILABLE = _code("TSA_UNAVAILABLE", 503, "The time-stamp authority did not answer.",
                        "Retried automatically.", retryable=True)
PDF_TOO_COMPLEX = _code("PDF_TOO_COMPLEX", 422,
                        "The PDF needs more CPU time or memory to read than the platform allows a document, or "
                        "passes a budget of intake's inspection (inflated bytes, objects, nesting: `detail` says "
                        "which; README, `pdf_max_*` settings).",
                        "Simplify the document (flatten forms, fewer objects, no huge inflating streams) or "
                        "print it to a new PDF; do not retry unchanged.")
PROCESSING_TIMEOUT = _code("PROCESSING_TIMEOUT", 503,
                           "The platform was too busy to finish the document in time; not a verdict on it.",
                           "Retry after the Retry-After delay.", retryable=True)
RATE_LIMITED = _code("RATE_LIMITED", 429, "This client sent more requests than the route allows per second.",
                     "Slow down; retry after the Retry-After delay.", retryable=True)
BUSY = _code("BUSY", 503, "Too many documents already wait for this kind of work.",
             "Retry after the Retry-After delay.", retryable=True)
TOKEN_BUSY = _code("TOKEN_BUSY", 503, "The signing token (HSM) was busy.", "Retried automatically.", retryable=True)
VALIDATION_DATA_UNAVAILABLE = _code(
    "VALIDATION_DATA_UNAVAILABLE", 503,
    "The revocation data (OCSP, CRL) a long-term-verifiable stamp carries could not be fetched or did not validate.",
    "Retried automatically; the unit stays reserved (a stamp is never issued at a lower PAdES level).",
    retryable=True)
SIGNING_CERT_REVOKED = _code(
    "SIGNING_CERT_REVOKED", 503, "The platform's signing certificate is revoked: stamping is stopped.",
    "Retried automatically once operations install a new signing key; the unit stays reserved.", retryable=True)

# --- verification verdicts: why a stamp does not vouch for a document ---------------------------
# Never raised: they are the `code` / `reasons[].code` of a `valid: false` answer of `POST /v1/verify`
# (HTTP 200, since the verification itself succeeded). The fix text is for the document's holder.
NO_STAMP = _code("NO_STAMP", 200, "The PDF carries no e-Meterai signature (no signature with `[SN]` in its reason).",
                 "Upload the stamped file as it was delivered, not a printout, scan or re-export.")
SIGNATURE_BROKEN = _code("SIGNATURE_BROKEN", 200,
                         "The e-Meterai signature does not verify: the signed bytes were altered, the signature "
                         "value or its `/ByteRange` is broken, or the signature was copied from another document.",
                         "The file is not the stamped document; ask its sender for the file as delivered by the "
                         "channel.")
NOT_OUR_ISSUER = _code("NOT_OUR_ISSUER", 200,
                       "The signature carrying the SN is not made by the e-Meterai issuer's key (its certificate "
                       "does not chain to the issuer's trust roots).",
                       "Treat the stamp as forged; only the issuer's signature makes an e-Meterai.")
CERT_REVOKED = _code("CERT_REVOKED", 200,
                     "The stamp's signing certificate (or a CA above it) was revoked, and no trusted time-stamp "
                     "proves the stamp existed before the revocation (ETSI EN 319 102-1: revoked after the "
                     "signature time-stamp leaves a stamp valid).",
                     "Treat the stamp as invalid; a document stamped after the revocation needs a new stamp.")
SN_UNKNOWN = _code("SN_UNKNOWN", 200, "The stamp's serial number was never issued (or is malformed).",
                   "Treat the stamp as forged; check the SN at `GET /v1/verify/{sn}`.")
SN_REUSED = _code("SN_REUSED", 200,
                  "The SN was issued for another document: the stamped revision of this file is not the file "
                  "the issuer delivered for that SN (or the SN is on record more than once).",
                  "One e-Meterai stamps one document; this document needs its own stamp.")
MODIFIED_AFTER_STAMPING = _code("MODIFIED_AFTER_STAMPING", 200,
                                "The document was changed after it was stamped: a later revision does more than add "
                                "signatures, validation data (DSS) or document time-stamps (`revision` and "
                                "`changed` say where).",
                                "Verify the file as it was stamped (the revision named in `stamp_revision`); a "
                                "changed document needs a new stamp.")
VERIFICATION_VERDICTS = (NO_STAMP, SIGNATURE_BROKEN, NOT_OUR_ISSUER, CERT_REVOKED, SN_UNKNOWN, SN_REUSED,
                         MODIFIED_AFTER_STAMPING)

# --- notification ----------------------------------------------------------------------------
QUERY_INVALID = _code("QUERY_INVALID", 422, "The query parameters do not select anything.",
                      "Give `event_id=<id>` or `since=<RFC 3339 time>` (see `detail`).")
WEBHOOK_REJECTED = _code("WEBHOOK_REJECTED", 502, "The channel's webhook endpoint answered with a non-2xx status.",
                         "Answer 2xx once the event is stored; Bubuh retries with backoff until the horizon.",
                         retryable=True)
WEBHOOK_TIMEOUT = _code("WEBHOOK_TIMEOUT", 504, "The channel's webhook endpoint did not answer in time.",
                        "Answer within the timeout (10 s); do slow work after answering 2xx.", retryable=True)
WEBHOOK_UNREACHABLE = _code("WEBHOOK_UNREACHABLE", 502, "The channel's webhook endpoint refused or dropped the "
                            "connection.", "Check the URL registered for the channel and that it is up.",
                            retryable=True)
WEBHOOK_NO_ENDPOINT = _code("WEBHOOK_NO_ENDPOINT", 409, "The channel has no webhook URL (or is unknown).",
                            "Register a webhook URL for the channel.", retryable=True)
WEBHOOK_SCHEME_FORBIDDEN = _code("WEBHOOK_SCHEME_FORBIDDEN", 422,
                                 "The webhook URL is not `https://`. Plain `http://` is accepted only in local mode "
                                 "(`BUBUH_WEBHOOK_LOCAL_MODE=true`, development and tests), and then only to loopback.",
                                 "Serve the webhook over https with a certificate for the URL's host name and register "
                                 "the `https://` URL (`bubuh channel set-webhook`).", retryable=True)
WEBHOOK_TARGET_FORBIDDEN = _code("WEBHOOK_TARGET_FORBIDDEN", 422,
                                 "The webhook URL's host is, or resolves to, an address Bubuh does not call: "
                                 "loopback, private (RFC 1918, CGNAT 100.64/10, IPv6 ULA), link-local or cloud "
                                 "metadata, multicast, reserved or unspecified (also inside IPv4-mapped IPv6); or the "
                                 "URL carries `user:password@`, a numeric host other than a dotted quad, or a name "
                                 "that does not resolve. Nothing was sent.",
                                 "Register a host name whose every DNS address is public (globally routable); write "
                                 "IPv4 literals as a.b.c.d; authenticate requests by `Bubuh-Signature`, not URL "
                                 "credentials. Checked at registration and again before every connection.",
                                 retryable=True)
EMAIL_REFUSED = _code("EMAIL_REFUSED", 502, "The mail server refused the message permanently (5xx).",
                      "Check the buyer's address; the email is not retried.")
EMAIL_UNAVAILABLE = _code("EMAIL_UNAVAILABLE", 503, "The mail server did not accept the message for now.",
                          "Retried automatically until the horizon.", retryable=True)
DELIVERY_EXPIRED = _code("DELIVERY_EXPIRED", 504,
                         "A webhook or email reached its horizon before any attempt was made (the endpoint's "
                         "circuit stayed open, or no sender ran). The `DeliveryAbandoned` entry carries this "
                         "code; an entry after attempts carries the last attempt's code.",
                         "Ask for the webhook again (`POST /v1/deliveries/{id}/redeliver`) once the endpoint is up.")


class ConfigError(Exception):
    """Configuration (or a dependency) that cannot work; the message is the one line the operator reads.

    Not a catalogued code: it stops the process (``bubuh: ...``, exit 2) instead of answering a channel.
    """


class BubuhError(Exception):
    """An error with a catalogued code; ``detail`` says what exactly was wrong."""

    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        super().__init__(code.text(detail or code.meaning))
        self.code = code
        self.detail = detail or code.meaning


def lookup(code: str) -> ErrorCode:
    return _CATALOGUE[code]


def code_of(text: str) -> ErrorCode | None:
    """The catalogued code a ``CODE: detail`` text (``ErrorCode.text``) starts with, if any."""
    return _CATALOGUE.get(text.partition(":")[0])


def catalogue() -> list[ErrorCode]:
    return list(_CATALOGUE.values())


def markdown() -> str:
    rows = ["| code | HTTP | meaning | what the caller should do | retried by Bubuh |", "|---|---|---|---|---|"]
    for e in _CATALOGUE.values():
        rows.append(f"| `{e.code}` | {e.http_status} | {e.meaning} | {e.action} | {'yes' if e.retryable else 'no'} |")
    return "\n".join(rows) + "\n"
