"""ShopML core: what every stage shares (schema, configuration, paths, CLI)."""

__version__ = "0.1.0"
