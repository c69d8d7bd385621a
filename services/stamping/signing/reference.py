"""The stamp as pyHanko's documentation does it: the baseline, deliberately untuned.

Why keep an untuned path: the production engine (``engine.py``) takes shortcuts
(key loaded once, fixed signature size, CMS templates, its own QR drawing). Every
shortcut is a chance to produce something subtly different. This module is the
yardstick: the benchmark measures the engine's speed-up against it, and the property
tests check that both produce signatures that validate and stamps that say the same.
So it follows the documented call sequence literally, including its costs: the
PKCS#12 is opened on every call, the signature size is estimated by a dry-run
signature, the QR code is drawn by pyHanko's ``QRStampStyle`` through ``qrcode``.
"""

from __future__ import annotations

import io
import os

from pyhanko.pdf_utils import layout
from pyhanko.pdf_utils.content import RawContent
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.text import TextBoxStyle
from pyhanko.sign import fields, signers
from pyhanko.stamp import QRStampStyle

from services.stamping.document.appearance import STAMP_TEXT_LINES, verification_url
from services.stamping.signing.request import StampRequest

# pyHanko interpolates %(name)s parameters; the SN line is filled per stamp. The opaque white
# background is style, not tuning: without it page text under the stamp garbles the QR code.
STAMP_STYLE = QRStampStyle(
    stamp_text="\n".join(STAMP_TEXT_LINES) + "\n%(sn)s",
    border_width=1,
    text_box_style=TextBoxStyle(font_size=8),
    background=RawContent(b"1 g 0 0 100 100 re f", box=layout.BoxConstraints(100, 100)),
    background_layout=layout.SimpleBoxLayoutRule(
        x_align=layout.AxisAlignment.ALIGN_MID, y_align=layout.AxisAlignment.ALIGN_MID,
        margins=layout.Margins.uniform(0), inner_content_scaling=layout.InnerScaling.STRETCH_FILL,
    ),
    background_opacity=1.0,
)


def stamp_reference(
    data: bytes,
    request: StampRequest,
    p12_path: str | os.PathLike,
    p12_password: str,
    verify_base_url: str,
    location: str | None = None,
    md_algorithm: str = "sha256",
) -> bytes:
    """Stamp ``data`` the documented way; returns the signed PDF (original bytes + one update)."""
    signer = signers.SimpleSigner.load_pkcs12(str(p12_path), passphrase=p12_password.encode())
    if signer is None:
        raise ValueError(f"could not load {p12_path}")
    meta = signers.PdfSignatureMetadata(
        field_name=request.field_name,
        reason=request.signature_reason,
        location=location or request.location,
        md_algorithm=md_algorithm,
        subfilter=fields.SigSeedSubFilter.PADES,
    )
    pdf_signer = signers.PdfSigner(
        meta,
        signer,
        stamp_style=STAMP_STYLE,
        new_field_spec=fields.SigFieldSpec(
            request.field_name, box=tuple(request.box), on_page=request.page - 1
        ),
    )
    out = pdf_signer.sign_pdf(
        IncrementalPdfFileWriter(io.BytesIO(data)),
        appearance_text_params={"url": verification_url(verify_base_url, request.sn), "sn": request.sn},
    )
    return out.getvalue()
