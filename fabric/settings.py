"""What every settings class of the fabric shares: environment names, strict loading, errors.

Each package owns its settings (``fabric.kvbm.config.KvbmConfig``; ``fabric.config.ServeConfig``
and the process-level ``FabricConfig`` that composes them). They all read ``FABRIC_<FIELD>``
(plus any legacy alias, e.g. Dynamo's ``DYN_KVBM_*``), are frozen once built, and are loaded
through ``load_settings``, which turns every validation problem into one ``ConfigError`` naming
each setting by its environment names. Imports only ``fabric.errors`` and pydantic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from fabric.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix="FABRIC_",
    case_sensitive=False,
    frozen=True,
    extra="ignore",
    validate_by_name=True,
    validate_by_alias=True,
)
"""The pydantic-settings options every settings class uses."""


def env(name: str, *aliases: str) -> AliasChoices:
    """The environment names of field ``name``: ``FABRIC_<NAME>`` first, then ``aliases``."""
    return AliasChoices(f"FABRIC_{name.upper()}", *aliases)


def load_settings(cls: type[SettingsT], overrides: Mapping[str, Any]) -> SettingsT:
    """``cls`` from the environment with ``overrides`` (field names) on top.

    Raises:
        ConfigError: a value is malformed or out of range, or an override names no field of
            ``cls``; the message names each setting by its environment names.
    """
    unknown = sorted(set(overrides) - set(cls.model_fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise settings_error(cls, exc) from None


def settings_error(cls: type[BaseSettings], exc: ValidationError) -> ConfigError:
    """One ``ConfigError`` listing every problem of ``exc`` with the setting's names."""
    problems = []
    for err in exc.errors():
        where = str(err["loc"][0]) if err["loc"] else "?"
        problems.append(f"{_setting_names(cls, where)}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError("invalid configuration: " + "; ".join(problems))


def _setting_names(cls: type[BaseSettings], where: str) -> str:
    """Every environment name of the field that ``where`` (a field name or alias) refers to."""
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        choices = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else []
        if where.lower() in (name, *(c.lower() for c in choices)):
            return " / ".join(choices) or name
    return where
