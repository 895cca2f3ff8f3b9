"""Host glue: the only code that knows a WebUI's internals (A1111, Forge, reForge)."""
