"""The engine: checkpoint -> module -> tokens -> text. Never imports cli, server, batch or bench."""
