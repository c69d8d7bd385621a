"""Email templates, Indonesian and English.

``BUBUH_EMAIL_LOCALE`` picks the language: ``id`` (default: the buyers are Indonesian), ``en``, or
``id+en`` for one bilingual message (Indonesian first, then English, subject "ID / EN"). Requests
carry no language of their own, so the choice is per deployment. The text is rendered when the
event arrives and stored with the email, so every retry sends the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCALES = ("id", "en", "id+en")


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


_SIGN_OFF = {"id": "Salam,\nBubuh e-Meterai", "en": "Regards,\nBubuh e-Meterai"}
_FOOTER = {
    "id": "Email ini dikirim otomatis; mohon tidak membalas.",
    "en": "This email was sent automatically; please do not reply.",
}

_TEMPLATES: dict[str, dict[str, tuple[str, str]]] = {
    "quota.credited": {
        "id": ("Kuota e-Meterai Anda telah ditambahkan",
               "Halo,\n\nPembayaran Anda telah kami terima: {quantity} e-Meterai telah ditambahkan ke akun "
               "{account_id}.\nSaldo tersedia sekarang: {available} e-Meterai.\n\nNomor pembelian: {purchase_id}"),
        "en": ("Your e-Meterai quota has been credited",
               "Hello,\n\nWe received your payment: {quantity} e-Meterai have been credited to account "
               "{account_id}.\nAvailable now: {available} e-Meterai.\n\nPurchase number: {purchase_id}"),
    },
    "stamp.completed": {
        "id": ("Dokumen Anda telah dibubuhi e-Meterai",
               "Halo,\n\nDokumen Anda telah dibubuhi e-Meterai.\nNomor seri (SN): {sn}\n"
               "Nomor permintaan: {request_id}\n\nDokumen bermeterai dapat diunduh melalui layanan tempat Anda "
               "mengajukannya."),
        "en": ("Your document has been stamped with an e-Meterai",
               "Hello,\n\nYour document has been stamped with an e-Meterai.\nSerial number (SN): {sn}\n"
               "Request number: {request_id}\n\nDownload the stamped document from the service where you "
               "submitted it."),
    },
    "stamp.failed": {
        "id": ("Pembubuhan e-Meterai gagal",
               "Halo,\n\nMaaf, dokumen Anda tidak dapat dibubuhi e-Meterai.\nKode: {code}\nKeterangan: {detail}\n"
               "Nomor permintaan: {request_id}\n\nKuota Anda tidak terpakai untuk permintaan ini."),
        "en": ("e-Meterai stamping failed",
               "Hello,\n\nSorry, your document could not be stamped with an e-Meterai.\nCode: {code}\n"
               "Detail: {detail}\nRequest number: {request_id}\n\nYour quota was not charged for this request."),
    },
}


def kinds() -> list[str]:
    return list(_TEMPLATES)


def _flat(data: dict) -> dict:
    out = dict(data)
    balance = data.get("balance") or {}
    out.setdefault("available", balance.get("available", ""))
    out["detail"] = data.get("detail") or "-"
    return out


def render(kind: str, data: dict, locale: str = "id") -> Rendered | None:
    """The email for an event of ``kind`` (a webhook type), or None when buyers get no email for it."""
    if locale not in LOCALES:
        raise ValueError(f"email locale {locale!r}: choose from {', '.join(LOCALES)}")
    template = _TEMPLATES.get(kind)
    if template is None:
        return None
    values = _flat(data)
    langs = locale.split("+")
    parts = []
    for lang in langs:
        _subject, text = template[lang]
        parts.append(f"{text.format(**values)}\n\n{_SIGN_OFF[lang]}\n\n{_FOOTER[lang]}")
    subject = " / ".join(template[lang][0] for lang in langs)
    return Rendered(subject=subject, body="\n\n----------------------------------------\n\n".join(parts) + "\n")
