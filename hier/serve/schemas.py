"""What the service answers, as pydantic models: ``/docs`` shows each schema and every response is
checked against it."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class RankedClass(_Model):
    rank: int
    fine_class: str = Field(alias="class", description="the fine class (make/model/generation/years)")
    brand: str
    model: str
    years: str
    p: float = Field(description="P(class)")
    p_model: float = Field(description="P(its model): the sum of its classes' probabilities")
    p_brand: float = Field(description="P(its brand)")


class Answer(_Model):
    """Brand, model and fine class read top-down (never contradicting), with their probabilities."""

    brand: str
    model: str
    fine: str
    years: str
    p: float = Field(description="P(fine class)")
    p_model: float
    p_brand: float
    topk: list[RankedClass] = Field(description="the likeliest fine classes (the first can differ from `fine`)")


class Listing(_Model):
    """A similar listing: its id, hier's answer for its photo, its similarity, a thumbnail URL (hier's own
    fields start with ``hier_``), and the sellers' own columns as given to ``hier index build``: a column
    whose every cell is a plain number (``12000``, ``12.5``) as a JSON number, any other as text
    (``"01234"`` stays ``"01234"``), an empty cell as null."""

    model_config = ConfigDict(extra="allow")
    listing_id: str
    hier_photo_url: str = Field(description="the listing's thumbnail (`hier_`: never a seller's column)")
    hier_similarity: float | None = None


class Similar(_Model):
    listings: list[Listing]


class NearClass(_Model):
    fine_class: str = Field(alias="class")
    similarity: float


class TakenFrom(_Model):
    fine_class: str = Field(alias="class")
    photos: int
    of: int
    share: float


class Enrolled(_Model):
    """What ``/enroll`` did; ``summary`` says it in words."""

    fine_class: str = Field(alias="class")
    summary: str
    head: str
    new: bool
    base: bool
    added: int
    total: int
    classes: int
    duplicates: int
    own_shots_answered: float | None = Field(None, description="share of the photos given answered as the class")
    base_photos_taken: float | None = Field(None, description="share of the known classes' held-out photos now "
                                                              "answered as it")
    taken_most_from: TakenFrom | None = None
    base_accuracy_before: float | None = Field(None, description="the known classes' held-out photos answered "
                                                                 "right before the change")
    base_accuracy_after: float | None = Field(None, description="... and after it (every changed answer)")
    near_duplicate: NearClass | None = None
    offset: float | None = Field(None, description="its score offset (positive: lowered to keep the base budget)")
    offset_cost: float | None = None
    calibrated: bool
    mapped: bool


class Unenrolled(_Model):
    fine_class: str = Field(alias="class")
    classes: int = Field(description="classes the artifact answers now")
    base: bool = Field(description="a known class's added shots were removed (the class stays)")


class Live(_Model):
    status: str
    uptime_s: float


class Ready(_Model):
    status: str
    detail: str | None
    artifact: str
    classes: int | None
    gallery: bool
    stale: bool
    uptime_s: float
    batches: int
    batched_photos: int
    queue: int
    batcher_restarts: int
