"""Per-store-kind fixtures: ``<kind>_store_table`` returns a config table on a fresh backend."""
