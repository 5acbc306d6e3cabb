"""`phi3v serve`: an OpenAI-compatible chat-completions server for vision requests, with a web page.

    from phi3v.server import create_app, ServerSettings
    app = create_app(phi3v.load(...), ServerSettings(api_key="..."))   # any ASGI server can run it
"""

from .settings import ServerSettings


def create_app(model, settings=None):
    from .app import create_app as _create_app  # fastapi is imported only when a server is made

    return _create_app(model, settings)


__all__ = ["ServerSettings", "create_app"]
