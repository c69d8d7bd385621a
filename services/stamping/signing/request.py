"""What one stamp needs to know, shared by the reference path and the production engine.

Kept apart from both so that the benchmark and the property tests can hand the very
same request to either path and compare what comes out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StampRequest:
    sn: str
    page: int  # 1-based, as channels send it (visSignaturePage)
    box: tuple[float, float, float, float]  # llx, lly, urx, ury in PDF points
    reason: str = "Meterai elektronik"
    location: str = "Indonesia"

    @property
    def field_name(self) -> str:
        # One signature field per stamp; a document may carry several e-Meterai.
        return f"eMeterai-{self.sn}"

    @property
    def signature_reason(self) -> str:
        # The issuer's convention, kept for verifiers that parse it: "[SN] reason".
        return f"[{self.sn}] {self.reason}"
