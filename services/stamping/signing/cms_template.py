"""The CMS SignedData of a stamp, serialised once and filled in per document.

Why a template: for one key every stamp's CMS object is the same bytes except three
places: the document digest inside the signed attributes, the signature value and
(B-T only) the time-stamp token. asn1crypto re-encodes certificates, algorithm
identifiers and attributes every time pyHanko builds a SignedData; here pyHanko
builds it once, at start-up, and we keep its bytes. Per stamp we splice the digest
in at a known offset, sign, and wrap the result with DER length headers.

Safety: the template is derived from a real pyHanko signature, and the constructor
re-assembles that very signature from the template and requires byte equality, so a
layout pyHanko changes in a future version fails loudly at start-up instead of
producing subtly different signatures.
"""

from __future__ import annotations

import asyncio
import hashlib

from asn1crypto import cms
from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes

_DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}
_CONTENT_TYPE_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # OID 1.2.840.113549.1.7.2


def der_header(tag: int, length: int) -> bytes:
    if length < 0x80:
        return bytes((tag, length))
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(body))) + body


def der(tag: int, content: bytes) -> bytes:
    return der_header(tag, len(content)) + content


class CmsTemplate:
    """PAdES B-B / B-T detached CMS for one signing key and digest algorithm."""

    def __init__(self, key, md_algorithm: str = "sha256") -> None:
        if md_algorithm not in _DIGEST_SIZES:
            raise ValueError(f"unsupported digest {md_algorithm!r}")
        self.md_algorithm = md_algorithm
        self.key = key
        marker = hashlib.new(md_algorithm, b"bubuh cms template marker").digest()
        signer = key.pyhanko_signer()
        sample = asyncio.run(signer.async_sign(
            marker, md_algorithm, use_pades=True, signed_attr_settings=PdfCMSSignedAttributes(),
        ))
        signed_data = sample["content"]
        (signer_info,) = signed_data["signer_infos"]
        attrs = bytearray(signer_info["signed_attrs"].dump())
        if attrs.count(marker) != 1 or attrs[0] != 0xA0:
            raise RuntimeError("unexpected pyHanko signed attributes layout")
        attrs[0] = 0x31  # signed as a SET OF (RFC 5652 5.4), embedded as [0] IMPLICIT
        at = attrs.index(marker)
        self._attrs_head = bytes(attrs[:at])
        self._attrs_tail = bytes(attrs[at + len(marker):])
        self._sd_head = b"".join(signed_data[k].dump() for k in (
            "version", "digest_algorithms", "encap_content_info", "certificates"))
        self._si_head = b"".join(signer_info[k].dump() for k in ("version", "sid", "digest_algorithm"))
        self._sig_alg = signer_info["signature_algorithm"].dump()
        # self-test: our assembly of pyHanko's own signature must equal pyHanko's bytes
        rebuilt = self.assemble(marker, signer_info["signature"].native, None)
        if rebuilt != sample.dump():
            raise RuntimeError("CMS template does not reproduce pyHanko's encoding")
        self.sample_size = len(rebuilt)

    def signed_attributes(self, document_digest: bytes) -> bytes:
        """The DER SET OF signed attributes for ``document_digest``: the bytes that get signed."""
        return self._attrs_head + document_digest + self._attrs_tail

    def assemble(self, document_digest: bytes, signature: bytes, unsigned_attrs: bytes | None) -> bytes:
        """DER ContentInfo; ``unsigned_attrs`` is the full [1] IMPLICIT element or None."""
        attrs = self.signed_attributes(document_digest)
        si = der(0x30, b"".join((
            self._si_head, b"\xa0", attrs[1:], self._sig_alg, der(0x04, signature), unsigned_attrs or b"",
        )))
        sd = der(0x30, self._sd_head + der(0x31, si))
        return der(0x30, _CONTENT_TYPE_SIGNED_DATA + der(0xA0, sd))

    def sign(self, document_digest: bytes) -> tuple[bytes, bytes]:
        """Return (signed attributes DER, raw signature) for ``document_digest``."""
        attrs = self.signed_attributes(document_digest)
        return attrs, self.key.sign_raw(attrs, self.md_algorithm)


def timestamp_attribute(token: cms.ContentInfo) -> bytes:
    """The unsignedAttrs element ([1] IMPLICIT) holding one signature time-stamp token."""
    attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "signature_time_stamp_token", "values": [token]}),
    ]).dump()
    return b"\xa1" + attrs[1:]
