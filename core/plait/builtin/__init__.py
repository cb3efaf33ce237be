"""Core's default hookimpls, registered through the plugin manager like any plugin."""
