"""Model providers behind one interface (design §3 "Providers").

``build_provider(settings)`` returns the configured one; the turn pipeline only
sees ``Provider.complete()``, ``Completion``, ``ToolCall`` and the two
``ProviderError`` kinds.
"""

from shared.providers.base import (
    Completion,
    Provider,
    ProviderError,
    ProviderPermanentError,
    ProviderTransientError,
    ToolCall,
)
from shared.providers.factory import build_provider
from shared.providers.offline import OfflineProvider
from shared.providers.openai import OpenAIProvider
from shared.providers.tokens import count_message_tokens, count_tokens, count_tool_schema_tokens

__all__ = [
    "Completion",
    "OfflineProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "ProviderPermanentError",
    "ProviderTransientError",
    "ToolCall",
    "build_provider",
    "count_message_tokens",
    "count_tokens",
    "count_tool_schema_tokens",
]
