"""Library outputs (hits, VQA answers, drawings, records, ingest reports) as response models.

Stored images are shown as URLs of ``GET /v1/records/{id}/image``, never as paths on the server.
"""

from __future__ import annotations

import base64
import io
from urllib.parse import quote

from PIL import Image

from mmrag.retrievers import Hit, IngestReport, Record

from ..outputs import ImageOutput, VQAOutput
from .schemas import (AskResponse, DrawResponse, HitOut, IngestReportOut, PartOut, RecordOut, ReferenceOut,
                      SearchResponse)

GIVEN_PREFIX = "given-"  # the ids the pipelines give references passed with a request


def image_url(record_id: str) -> str:
    return f"/v1/records/{quote(record_id, safe='')}/image"


def hit_out(hit: Hit) -> HitOut:
    r = hit.record
    return HitOut(id=hit.id, rank=hit.rank, score=hit.score, scores=hit.scores, text=r.text,
                  source_path=r.source_path, metadata=r.metadata, image_url=image_url(hit.id), parts=parts_out(hit))


def parts_out(hit: Hit) -> list[PartOut]:
    """A document hit's parts; an image part by its source path (server paths are not shown)."""
    return [PartOut(index=p.index, kind=p.kind, score=p.score, text=p.text, source_path=p.source_path)
            for p in hit.parts]


def search_out(hits, timings: dict[str, float]) -> SearchResponse:
    return SearchResponse(hits=[hit_out(h) for h in hits], collapsed=getattr(hits, "collapsed", 0), timings=timings)


def reference_out(hit: Hit, given: bool = False) -> ReferenceOut:
    r = hit.record
    return ReferenceOut(id=hit.id, rank=hit.rank, score=hit.score, scores=hit.scores, text=r.text,
                        source_path=r.source_path, metadata=r.metadata, image_url=None if given else image_url(hit.id),
                        parts=parts_out(hit))


def ask_out(out: VQAOutput) -> AskResponse:
    d = out.to_dict()
    d["references"] = [reference_out(h) for h in out.references]
    return AskResponse(**d)


def draw_out(out: ImageOutput, given_references: bool) -> DrawResponse:
    return DrawResponse(images=[base64.b64encode(png(im)).decode("ascii") for im in out.images],
                        references=[reference_out(h, given=given_references) for h in out.references],
                        guidance=out.guidance, fallback=out.fallback, timings=out.timings, decision=out.decision,
                        decision_score=out.decision_score, decision_threshold=out.decision_threshold,
                        decision_reason=out.decision_reason)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def record_out(record: Record) -> RecordOut:
    return RecordOut(id=record.id, text=record.text, metadata=record.metadata, source_path=record.source_path,
                     image_url=image_url(record.id))


def report_out(report: IngestReport) -> IngestReportOut:
    return IngestReportOut(**report.to_dict(), rejections=[{"ref": r.ref, "reason": r.reason} for r in report.rejected])
