"""``build_provider(settings)``: the provider ``MODEL_PROVIDER`` names, wired from settings."""

from __future__ import annotations

from typing import Any

from shared.providers.base import Provider
from shared.providers.offline import OfflineProvider
from shared.providers.openai import OpenAIProvider
from shared.settings import Settings, SettingsError

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"


def build_provider(settings: Settings, **options: Any) -> Provider:
    """The provider ``settings.model_provider`` names, wired from settings.

    ``options`` go to the provider's constructor (e.g. ``backoff_base`` for the
    ``openai`` provider in tests).

    :raises SettingsError: an unknown ``MODEL_PROVIDER``.
    """
    if settings.model_provider == "offline":
        options.setdefault("stream_delay", settings.offline_stream_delay_seconds)
        return OfflineProvider(**options)
    if settings.model_provider == "openai":
        options.setdefault("timeout", settings.openai_timeout_seconds)
        return OpenAIProvider(
            base_url=settings.openai_base_url or DEFAULT_OPENAI_BASE_URL,
            api_key=settings.openai_api_key,
            **options,
        )
    raise SettingsError(f"MODEL_PROVIDER must be 'offline' or 'openai', got {settings.model_provider!r}")
