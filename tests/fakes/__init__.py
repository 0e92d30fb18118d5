"""Real stand-ins for outside services.

``tests.fakes.openai_server``: a local OpenAI-compatible HTTP server
(``FakeOpenAIServer``, fixture ``fake_openai``). Kept out of this package's
namespace so ``python -m tests.fakes.openai_server`` runs it cleanly.
"""
