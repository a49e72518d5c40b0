"""The records of the knowledge base over HTTP: upload, list (export), get, image, delete.

Uploads go through :meth:`KnowledgeBase.add`, so they get ingestion's checks and guarantees: a bad
item is a line of the report (never a failed request, unless every item is bad), ids are the
client's or derived from the content (uploading the same records again adds nothing), and the
write is journaled under the KB's writer lock. Listing pages through the text collection with
Chroma's own ``get(where, limit, offset)`` (insertion order, stable while nothing is written).

Record ids may contain ``/`` (``cats/001``): the routes take the rest of the path as the id, with
the image route matched first, so only an id ending in ``/image`` cannot be addressed.
"""

from __future__ import annotations

import mimetypes
import os

from fastapi import APIRouter, Depends, Query as QueryParam, Request
from fastapi.responses import FileResponse

from mmrag.retrievers import KnowledgeBaseError, Record
from mmrag.retrievers.kb.store import decode_record
from mmrag.retrievers.retriever import validate_where

from .auth import Authenticator
from .errors import AllRejectedError, InvalidRequestError, NotFoundError
from .payloads import decode_base64, parse_json
from .routes_query import body_of
from .schemas import (MAX_PAGE, Deleted, IngestReportOut, RecordOut, RecordsForm, RecordsPage, RecordsRequest,
                      json_or_form)
from .service import Service
from .views import record_out, report_out

# Chroma takes limit and offset as unsigned 32-bit integers; larger ones fail inside it.
MAX_OFFSET = 2**31 - 1


def build_router(service: Service, auth: Authenticator) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["records"])
    read, write = [Depends(auth.require("read"))], [Depends(auth.require("write"))]

    @router.post("/records", response_model=IngestReportOut, dependencies=write, summary="Add records",
                 openapi_extra=json_or_form(RecordsRequest, RecordsForm))
    def add_records(request: Request, body=Depends(body_of(RecordsRequest, RecordsForm))) -> IngestReportOut:
        """Upload (image, text) records: JSON with base64 images, or a multipart form with the image
        files. The answer is the ingest report; when every record was rejected it is a 422 whose
        error carries the report."""
        if isinstance(body, RecordsForm):
            records, param = _form_records(body, getattr(request.state, "filenames", {}).get("files")), "files"
        else:
            records, param = [Record(text=r.text, image=decode_base64(f"records[{i}].image", r.image), id=r.id,
                                     metadata=r.metadata, source_path=r.source_path)
                              for i, r in enumerate(body.records)], "records"
        report = service.add_records(records)
        out = report_out(report)
        if report.all_rejected:
            first = report.rejected[0]
            raise AllRejectedError(f"All {report.seen} uploaded records were rejected, e.g. {first.ref}: "
                                   f"{first.reason}.", out.model_dump(), param=param)
        return out

    @router.get("/records", response_model=RecordsPage, dependencies=read, summary="List (export) records")
    def list_records(offset: int = QueryParam(0, ge=0, le=MAX_OFFSET),
                     limit: int = QueryParam(50, ge=1, le=MAX_PAGE),
                     where: str | None = QueryParam(None, description='metadata filter as JSON, e.g. {"kind": "dog"}'),
                     ids: str | None = QueryParam(None, description='only these records, as a JSON list of ids '
                                                  '(e.g. ["a", "b"]; at most 1000), in the order given; ids not '
                                                  'stored are left out')
                     ) -> RecordsPage:
        """A page of records (id, text, metadata, source path, image URL), in insertion order;
        follow `next_offset` until it is null. With `ids`: those records, in that order (one
        request for many; `offset` and `limit` page through the list)."""
        flt = validate_where(parse_json(where, "where")) if where is not None else None
        if ids is not None:
            ids = _id_list(parse_json(ids, "ids"))
            wanted = list(dict.fromkeys(ids))[offset:offset + limit]
            res = service.kb.vectors.texts.get(ids=wanted, where=flt, include=["metadatas", "documents"]) \
                if wanted else {"ids": [], "metadatas": [], "documents": []}
            by_id = {i: (m, d) for i, m, d in zip(res["ids"], res["metadatas"], res["documents"], strict=True)}
            records = [record_out(decode_record(i, *by_id[i], service.kb.images)) for i in wanted if i in by_id]
            more = offset + limit < len(dict.fromkeys(ids))
            return RecordsPage(records=records, offset=offset, limit=limit, next_offset=offset + limit if more else None)
        # one more than asked: whether a next page exists, without a count of the filtered records
        res = service.kb.vectors.texts.get(where=flt, limit=limit + 1, offset=offset,
                                           include=["metadatas", "documents"])
        rows = list(zip(res["ids"], res["metadatas"], res["documents"], strict=True))
        records = [record_out(decode_record(i, m, d, service.kb.images)) for i, m, d in rows[:limit]]
        return RecordsPage(records=records, offset=offset, limit=limit,
                           next_offset=offset + limit if len(rows) > limit else None)

    # before /records/{id}: an id may contain "/", and this one ends in "/image"
    @router.get("/records/{record_id:path}/image", dependencies=read, summary="A record's stored image",
                response_class=FileResponse, responses={
                    200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}},
                          "description": "the stored file, byte for byte"}})
    def record_image(record_id: str) -> FileResponse:
        path = service.record(record_id).image
        if not os.path.isfile(path):  # checked here: FileResponse would fail after the headers, as a 500
            raise KnowledgeBaseError(f"Record {record_id!r}: its stored image {path!r} is missing; run "
                                     "`mmrag kb verify --kb DIR` to check the knowledge base.")
        return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    @router.get("/records/{record_id:path}", response_model=RecordOut, dependencies=read, summary="One record")
    def get_record(record_id: str) -> RecordOut:
        return record_out(service.record(record_id))

    @router.delete("/records/{record_id:path}", response_model=Deleted, dependencies=write, summary="Delete a record")
    def delete_record(record_id: str) -> Deleted:
        """Removes the record from both collections and its image when no other record uses it."""
        if service.delete_record(record_id) == 0:
            raise NotFoundError(f"No record with id {record_id!r} in the knowledge base.", param="record_id")
        return Deleted(deleted=1)

    return router


def _id_list(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(i, str) and i for i in value):
        raise InvalidRequestError(f"`ids` must be a JSON list of record ids (non-empty strings), got {value!r}.",
                                  param="ids")
    if len(value) > MAX_PAGE:
        raise InvalidRequestError(f"`ids` lists {len(value)} ids; ask for at most {MAX_PAGE} per request.",
                                  param="ids")
    return value


def _form_records(form: RecordsForm, filenames: list[str | None] | None) -> list[Record]:
    """One record per uploaded file; ``texts``, ``ids`` and ``metadata`` in the files' order. A file
    without a text becomes a record with an empty one, which ingestion rejects with its reason."""
    n = len(form.files)
    for name in ("texts", "ids"):
        values = getattr(form, name)
        if values is not None and len(values) != n:
            raise InvalidRequestError(f"`{name}` has {len(values)} values for {n} files; give one per file, in order.",
                                      param=name)
    metadata = parse_json(form.metadata, "metadata") if form.metadata is not None else [{}] * n
    if not isinstance(metadata, list) or len(metadata) != n or not all(isinstance(m, dict) for m in metadata):
        raise InvalidRequestError(f"`metadata` must be a JSON array of {n} objects (one per file), got "
                                  f"{str(form.metadata)[:100]!r}.", param="metadata")
    filenames = filenames if filenames is not None and len(filenames) == n else [None] * n
    return [Record(text=form.texts[i] if form.texts is not None else "", image=form.files[i],
                   id=form.ids[i] if form.ids is not None else None, metadata=metadata[i],
                   source_path=filenames[i] or None)
            for i in range(n)]
