"""Document profiles: the acceptance rules a channel chooses per stamp request.

One catalogue for two services: the purchase service's channel registry accepts a channel's default
profile only from here, and the stamping service's inspection applies the rules.

Why data and not code: the rules come from outside (the CPNS 2024 rules were
published by BKN: A4, at most 800 KB, PDF 1.6 or later) and change per campaign.
A new campaign should be a new entry here, reviewed like configuration, not a new
branch in the inspection code.
"""

from __future__ import annotations

from dataclasses import dataclass

A4_PT = (595.276, 841.89)  # 210 x 297 mm in PDF points (1/72 inch)


@dataclass(frozen=True)
class Profile:
    name: str
    max_bytes: int
    page_size_pt: tuple[float, float] | None = None  # required size, either orientation
    page_size_tolerance_pt: float = 3.0  # exporters round A4 to 595x842 or 594.96x841.92
    min_pdf_version: tuple[int, int] | None = None
    min_box_side_pt: float = 20.0  # below this the QR code cannot be scanned


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(name="standard", max_bytes=10 * 1024 * 1024),
        Profile(name="cpns", max_bytes=800 * 1024, page_size_pt=A4_PT, min_pdf_version=(1, 6)),
    )
}

# The largest input any profile accepts: intake can refuse bigger bodies before buffering them.
MAX_BYTES_ANY_PROFILE = max(p.max_bytes for p in PROFILES.values())
