"""`mlora serve`: an OpenAI/vLLM-compatible HTTP server over one AsyncLLM (aiohttp).

    from engine.server import ServerConfig, serve, create_app, start_server
"""

from __future__ import annotations

from engine.server.app import create_app
from engine.server.config import ServerConfig
from engine.server.run import serve, start_server

__all__ = ["ServerConfig", "create_app", "serve", "start_server"]
