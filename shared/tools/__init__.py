"""Tools the model can call during a turn: ``search`` and ``file_read``.

``shared.tools.registry.build_registry(settings)`` builds the registry a process
uses; the turn runner offers ``registry.schemas()`` to the model and dispatches
its calls through ``registry.call(...)``.
"""
