"""Building blocks the experiment schemas share: field types (ids, platforms, surfaces, free text) and the
helpers validators use to name the exact bad field (``variants.1.weight``), not just the model.

Ids are limited by ``Settings.max_id_length``: validate with ``context={"settings": settings}`` (or
``{"max_id_length": n}``); without a context the environment's settings apply.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, StrictStr, StringConstraints, ValidationError, ValidationInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from abstream.config import Settings

ABSOLUTE_MAX_ID_LENGTH = 1024
"""Hard cap for ids in the JSON Schema; the effective limit is ``Settings.max_id_length``."""

Platform = Literal["ios", "android"]
Surface = Literal["v1", "apiv1"]

JsonObject = dict[str, Any]


def field_error(loc: tuple[int | str, ...], code: str, message: str, value: Any) -> InitErrorDetails:
    # Braces in user values must not be read as template fields.
    safe = message.replace("{", "{{").replace("}", "}}")
    return InitErrorDetails(type=PydanticCustomError(code, safe), loc=loc, input=value)


def raise_field_errors(title: str, errors: list[InitErrorDetails]) -> None:
    """Raise errors located below the model being validated; pydantic prefixes the outer path."""
    if errors:
        raise ValidationError.from_exception_data(title, errors)


@lru_cache(maxsize=1)
def _env_settings() -> Settings:
    return Settings.from_env()


def _id_limit(context: Any) -> int:
    """The effective id length limit: ``context={"settings": s}`` from the route, else the environment's."""
    if isinstance(context, dict):
        settings = context.get("settings")
        if isinstance(settings, Settings):
            return settings.max_id_length
        limit = context.get("max_id_length")
        if isinstance(limit, int):
            return limit
    return _env_settings().max_id_length


def _check_id_length(value: str, info: ValidationInfo) -> str:
    if value.isspace():
        raise PydanticCustomError("blank_string", "must contain a non-space character")
    if "\x00" in value:  # C strings, terminals and PostgreSQL text end at the first NUL: the id would be cut
        raise PydanticCustomError("nul_character", "must not contain NUL (U+0000)")
    limit = _id_limit(info.context)
    if len(value) > limit:
        raise PydanticCustomError(
            "string_too_long", "String should have at most {max_length} characters", {"max_length": limit}
        )
    return value


IdStr = Annotated[
    StrictStr, StringConstraints(min_length=1, max_length=ABSOLUTE_MAX_ID_LENGTH), AfterValidator(_check_id_length)
]
"""A user/session/install id: a JSON string, not blank, at most ``Settings.max_id_length`` characters."""

OptionalText = Annotated[str, StringConstraints(max_length=2000)]
