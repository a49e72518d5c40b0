"""Reading request bodies: JSON or a multipart form into one of the request models, base64 into
bytes, and bytes into a checked query image.

FastAPI declares a body as JSON or as a form, not as either; the routes that take both (search,
ask, records) read it here, and the OpenAPI schema names both (``schemas.json_or_form``).
Validation failures raise FastAPI's own ``RequestValidationError``, so that every 422 has the same
shape whoever raised it.
"""

from __future__ import annotations

import base64
import binascii
import json
import types
import typing
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from mmrag.retrievers import ConfigError, Query

from .errors import InvalidRequestError, ServeError


class UnsupportedMediaTypeError(ServeError):
    status = 415
    type = "unsupported_media_type"


async def read_body(request: Request, json_model: type[BaseModel], form_model: type[BaseModel] | None = None):
    """The request body as ``json_model`` (JSON) or ``form_model`` (multipart form)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data" and form_model is not None:
        request.state.filenames = {}  # field -> the uploads' file names (a record keeps its as source_path)
        async with request.form() as form:
            return validate(form_model, await _form_values(form, form_model, request.state.filenames))
    if media in ("application/json", "") or media.endswith("+json"):
        return validate(json_model, parse_json(await request.body()))
    accepted = "application/json" + (" or multipart/form-data" if form_model is not None else "")
    raise UnsupportedMediaTypeError(f"The body's Content-Type is {media!r}; send {accepted}.")


def parse_json(raw: bytes | str, param: str | None = None) -> Any:
    """JSON without NaN or Infinity (Python's parser takes them; JSON and Chroma do not)."""
    what = f"`{param}`" if param else "The request body"
    if not raw:
        raise InvalidRequestError(f"{what} is empty; send a JSON {'value' if param else 'object'}.", param=param)

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"{what} is not valid JSON ({e}).", param=param) from None


def validate(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]) \
            from None


async def _form_values(form, model: type[BaseModel], filenames: dict[str, list[str | None]]) -> dict[str, Any]:
    """Form fields as the values ``model`` validates: files read, repeated fields as lists, object
    fields parsed from JSON text; a field the model lacks is passed on for it to refuse."""
    data: dict[str, Any] = {}
    for name in dict.fromkeys(form.keys()):
        values = form.getlist(name)
        field = model.model_fields.get(name)
        kind = _kind(field.annotation) if field is not None else "scalar"
        files = [v for v in values if isinstance(v, UploadFile)]
        if kind in ("file", "files"):
            if len(files) != len(values):
                raise InvalidRequestError(f"`{name}` must be sent as a file part (with a filename).", param=name)
            blobs = [await f.read() for f in files]
            filenames[name] = [f.filename for f in files]
            data[name] = blobs if kind == "files" else _one(name, blobs)
            continue
        if files:
            raise InvalidRequestError(f"`{name}` is a text field, not a file.", param=name)
        if kind == "list":
            data[name] = values
        elif kind == "json":
            data[name] = parse_json(_one(name, values), param=name)
        else:
            data[name] = _one(name, values)
    return data


def _one(name: str, values: list) -> Any:
    if len(values) != 1:
        raise InvalidRequestError(f"`{name}` was given {len(values)} times; give it once.", param=name)
    return values[0]


def _kind(annotation: Any) -> str:
    """file, files, list, json (an object) or scalar, for a form field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if annotation is bytes:
        return "file"
    if origin is list:
        return "files" if typing.get_args(annotation) == (bytes,) else "list"
    if origin is dict or annotation is dict:
        return "json"
    return "scalar"


def decode_base64(param: str, value: str) -> bytes:
    """The bytes of a base64 string or a ``data:...;base64,`` URL."""
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequestError(f"`{param}` is a data: URL without base64 data ({header[:60]!r}); "
                                      "give 'data:image/png;base64,...'.", param=param)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)  # line breaks are fine, stray bytes not
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"`{param}` is not valid base64 ({e}): send the image file's bytes "
                                  "base64-encoded (standard alphabet, with padding), or use the multipart form.",
                                  param=param) from None
    if not data:
        raise InvalidRequestError(f"`{param}` is empty; give an image.", param=param)
    return data


def load_image(param: str, data: bytes) -> Image.Image:
    """``data`` as a checked RGB image: the query path's checks (:meth:`Query.coerce`), which are
    ingestion's (format allow-list, decompression bombs, pixel and aspect-ratio limits)."""
    try:
        return Query.coerce(Query(image=data)).image
    except ConfigError as e:  # the library's message, naming the request's field instead of its own
        raise InvalidRequestError(str(e).replace("`query.image`", f"`{param}`"), param=param) from None
